"""Crash-safe writes into a user's folder: a set of named files replaced as one, nothing else touched.

A checkpoint is several files (config.json, model.safetensors or an index and its shards, …)
that must change together, inside a folder that also holds the user's own files (a tokenizer, a
README, results). `commit_files` replaces exactly the named files and removes exactly the named
stale ones, and a crash at any instant leaves the folder holding the old set or the new set,
never a mix:

1. stage: every new file is written and fsynced in a hidden staging folder inside the target
   (`.mplus_fast-staging-*`), so the final renames stay on one file system;
2. commit point: a journal `.mplus_fast-commit.json` naming the staged files and the stale ones
   is written atomically (temporary file, fsync, rename);
3. apply: each staged file is renamed over its target, the stale files are removed, the folder
   is fsynced, then the journal and the staging folder are removed.

A crash before 2 leaves the old set and a staging folder that the next access removes; a crash
after 2 leaves a journal that the next access (`recover`, run by every load and save) applies
again (every step is idempotent), which gives the new set. Writers of one folder are serialised
by an exclusive `flock` on the folder itself (no lock file is left behind); readers take it too,
so a load never sees a commit half applied.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

JOURNAL = ".mplus_fast-commit.json"
STAGING_PREFIX = ".mplus_fast-staging-"
TMP_PREFIX = ".mplus_fast-tmp-"

try:  # POSIX; elsewhere writers are not serialised (a single writer is assumed)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class CommitError(OSError):
    """A folder's interrupted commit that cannot be completed (e.g. the folder became read-only)."""


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (folders: where the platform allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """One file replaced atomically: temporary sibling, fsync, rename, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


@contextlib.contextmanager
def folder_lock(folder: Path, shared: bool = False):
    """An exclusive (or shared) advisory lock on `folder` for this block."""
    if fcntl is None:
        yield
        return
    fd = os.open(str(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"commit_files: {name!r} is not a plain file name inside the folder")


def _apply(folder: Path, journal: dict) -> None:
    staging = folder / journal["staging"]
    for name in journal["files"]:
        src = staging / name
        if src.exists():
            os.replace(src, folder / name)
    for name in journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    fsync_path(folder)
    (folder / JOURNAL).unlink()
    fsync_path(folder)
    shutil.rmtree(staging, ignore_errors=True)


def _read_journal(folder: Path) -> dict | None:
    path = folder / JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
        names = [journal["staging"], *journal["files"], *journal["remove"]]
        for name in names:
            _check_name(name)
    except (ValueError, KeyError, TypeError) as exc:
        raise CommitError(f"{path}: unreadable commit journal ({exc}); it was not written by mplus_fast, "
                          "or was edited: remove it to keep the files as they are") from None
    if not journal["staging"].startswith(STAGING_PREFIX):
        raise CommitError(f"{path}: the journal's staging folder {journal['staging']!r} is not one of ours")
    return journal


def _unlocked_recover(folder: Path, tidy: bool) -> bool:
    journal = _read_journal(folder)
    if journal is not None:
        try:
            _apply(folder, journal)
        except OSError as exc:
            raise CommitError(f"{folder}: an interrupted save left a commit journal ({JOURNAL}) that cannot be "
                              f"completed ({exc}); give the folder write access and load it again") from exc
    if tidy:  # leftovers of commits that never reached their commit point
        for p in folder.iterdir():
            if p.name.startswith(STAGING_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    p.unlink()
    return journal is not None


def recover(folder: str | Path) -> bool:
    """Finish (or discard) an interrupted commit in `folder`; True when a commit was completed.
    Only tidies what mplus_fast itself stages; a read-only folder without a journal is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    writable = os.access(folder, os.W_OK)
    if not writable and not (folder / JOURNAL).exists():
        return False
    with folder_lock(folder):
        return _unlocked_recover(folder, tidy=writable)


def commit_files(folder: str | Path, files: dict[str, Callable[[Path], None]],
                 stale: Callable[[Path], Iterable[str]] | Iterable[str] = ()) -> Path:
    """Replace the files `files` (name -> a writer that creates that file at the path it is given)
    in `folder` as one, and remove the names in `stale` (or returned by `stale(folder)`, computed
    under the lock) that are not rewritten. Every other file in the folder is left alone.
    Creates the folder when it does not exist. Returns the folder's path."""
    folder = Path(folder)
    for name in files:
        _check_name(name)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        _unlocked_recover(folder, tidy=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            for name, writer in files.items():
                writer(staging / name)
                fsync_path(staging / name)
            fsync_path(staging)
            removals = set(stale(folder) if callable(stale) else stale) - set(files)
            for name in removals:
                _check_name(name)
            journal = {"version": 1, "staging": staging.name, "files": sorted(files), "remove": sorted(removals)}
            write_bytes_atomic(folder / JOURNAL, (json.dumps(journal, indent=1) + "\n").encode())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _apply(folder, journal)  # past the commit point: a failure here is completed by `recover`
    return folder

"""Crash trials (issue 14 item 2): a save (checkpoint or memory file) killed with SIGKILL at random
points, a full disk and a read-only folder all leave the old save or the new one, loadable, and
the user's files.

The full-disk and read-only cases use a real small tmpfs when this process may mount one (root
with CAP_SYS_ADMIN, as on the development machine); elsewhere they fall back to a simulated
failure: safetensors' own full-disk error raised from inside the write (the message it really
gives), and a folder made read-only with chmod (or, for root without mount rights, an EACCES
raised where the save first creates a file). Each test reports which one it ran."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mplus_fast
from mplus_fast import atomic, checkpoint
from mplus_fast.checkpoint import SaveError
from mplus_fast.cli import app

REPO = Path(__file__).resolve().parents[2]
USER = {"README.md": "# mine\n", "notes/todo.txt": "keep\n"}


def plant(folder):
    for name, text in USER.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def files_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def inject(model, n=3):
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        model.inject_memory(torch.randint(3, model.config.vocab_size, (1, 20), generator=g), update_memory=True)


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("MPLUS_FAST_TEST_NO_MOUNT"):
        return False   # MPLUS_FAST_TEST_NO_MOUNT=1 runs the fallbacks on a machine that could mount
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"mplus-test-{uuid.uuid4().hex[:8]}", str(path)],
                       capture_output=True)
    return r.returncode == 0


@contextlib.contextmanager
def small_disk(path: Path, size: int):
    """A tmpfs of `size` bytes at `path` (yields True), or a plain folder (yields False)."""
    mounted = _mount_tmpfs(path, size)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------- kill -9
@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "memory"])
def test_kill_9_during_save_at_200_random_points(tmp_path, what):
    out = tmp_path / "trials.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "crash_trials.py"), "--trials", "200", "--json", str(out),
                        "--work", str(tmp_path), "--what", what], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["trials"] == 200
    assert sum(result["outcomes"].values()) == 200 and result["outcomes"]["new"] > 0
    assert result["kills_landed"].get("before the commit point", 0) > 20, result   # most kills hit the save itself


# ---------------------------------------------------------------------- a full disk
def test_a_full_disk_keeps_the_old_checkpoint_with_a_clear_error(tiny_model, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    probe = tiny_model.save_pretrained(tmp_path / "probe")
    one = sum(len(b) for b in files_of(probe).values())
    with small_disk(disk, int(one * 1.6) + 64 * 1024) as real:
        target = disk / "ckpt"
        tiny_model.save_pretrained(target)
        plant(target)
        before = files_of(target)
        inject(tiny_model)
        if not real:   # simulated: safetensors' full-disk error, raised half-way through the write
            def full(tensors, path, metadata=None):
                Path(path).write_bytes(b"\0" * 1000)
                raise checkpoint.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            monkeypatch.setattr(checkpoint, "save_file", full)
        with pytest.raises(SaveError, match=r"failed: No space left on device; the checkpoint that was there is unchanged") as e:
            tiny_model.save_pretrained(target)
        assert e.value.errno == errno.ENOSPC
        assert files_of(target) == before, "the old checkpoint or the user's files changed"
        assert not [p for p in target.iterdir() if p.name.startswith(".mplus_fast")], "staging left behind"
        assert mplus_fast.load(target).memory_stats()["injections"] == 0
        result = CliRunner().invoke(app, ["inject", str(target), "--ids", ",".join(map(str, range(5, 30))), "--in-place"])
        assert result.exit_code == 2 and "No space left on device" in result.output and "Traceback" not in result.output
        assert files_of(target) == before
    print("full disk:", "a real tmpfs" if real else "simulated (no mount here)")


def test_a_full_disk_keeps_the_old_memory_file(tiny_model, tmp_path, monkeypatch):
    disk = tmp_path / "mdisk"
    probe = tiny_model.save_memory(tmp_path / "probe.safetensors")
    with small_disk(disk, int(probe.stat().st_size * 1.4) + 8192) as real:
        target = disk / "mine.safetensors"
        tiny_model.save_memory(target)
        plant(disk)
        before = files_of(disk)
        inject(tiny_model)
        if not real:
            def full(tensors, path, metadata=None):
                Path(path).write_bytes(b"\0" * 1000)
                raise checkpoint.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            monkeypatch.setattr(checkpoint, "save_file", full)
        with pytest.raises(SaveError, match=r"No space left on device; the memory file that was there is unchanged"):
            tiny_model.save_memory(target)
        assert files_of(disk) == before
        tiny_model.load_memory(target)
        assert tiny_model.memory_stats()["injections"] == 0
    print("full disk (memory file):", "a real tmpfs" if real else "simulated (no mount here)")


# ---------------------------------------------------------------------- a read-only folder
def test_a_read_only_folder_keeps_the_old_checkpoint_with_a_clear_error(tiny_model, tmp_path, monkeypatch):
    disk = tmp_path / "ro"
    with small_disk(disk, 8 * 2**20) as real:
        target = disk / "ckpt"
        tiny_model.save_pretrained(target)
        plant(target)
        before = files_of(target)
        inject(tiny_model)
        if real:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            how = "a read-only tmpfs"
        elif os.geteuid() != 0:
            target.chmod(0o555)
            how = "chmod 555"
        else:   # root ignores permissions; make the first file the save creates fail as it would
            def denied(*a, **k):
                raise PermissionError(errno.EACCES, "Permission denied", str(target))
            monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
            how = "simulated EACCES"
        try:
            with pytest.raises(SaveError, match=r"failed: (Read-only file system|Permission denied); the checkpoint that was there is unchanged"):
                tiny_model.save_pretrained(target)
            assert files_of(target) == before
            loaded = mplus_fast.load(target)        # reading a read-only checkpoint works
            assert loaded.memory_stats()["injections"] == 0
        finally:
            if not real:
                target.chmod(0o755)
    print("read-only folder:", how)


def test_an_interrupted_save_on_a_now_read_only_folder_says_what_to_do(tiny_model, tmp_path):
    """A journal left by a crash past the commit point cannot be applied without write access."""
    disk = tmp_path / "ro2"
    with small_disk(disk, 8 * 2**20) as real:
        if not real:
            pytest.skip("needs a read-only mount (root with mount rights)")
        target = tiny_model.save_pretrained(disk / "ckpt")
        (target / atomic.JOURNAL).write_text(json.dumps({"version": 1, "staging": atomic.STAGING_PREFIX + "x",
                                                         "files": ["config.json"], "remove": []}))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(atomic.CommitError, match="give the folder write access"):
            mplus_fast.load(target)

"""Where a run's results go, and how a killed run continues.

A run folder holds:
- `run.json`: the task, its settings, the model (path, config hash), package version, git
  commit, device, torch version; written when the run starts;
- `examples.jsonl`: one line per finished example (its key and every measurement), appended
  and flushed to disk as each example finishes;
- `results.json`: the summary tables and timings, rewritten at the end (and by every resume);
- the task's PNG plots.
Resuming: a run folder whose `run.json` has the same task, settings and model continues: the
examples already in `examples.jsonl` are read back and skipped, so nothing is counted twice; a
line cut short by a kill is dropped (and its example redone). A folder holding a run with other
settings is refused unless the caller asks to start over.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from mplus_fast.atomic import write_bytes_atomic


class RunFolderError(ValueError):
    """The output folder holds another run (the message says what differs)."""


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("mplus_fast")
    except Exception:
        return "unknown"


def git_commit() -> str | None:
    """The commit of the source tree the package runs from (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(source) -> dict:
    """Which code and model produced the numbers."""
    return {
        "model": {"path": source.path, "architecture": source.config.architecture, "config_hash": source.config_hash(),
                  "backend": source.backend, "dtype": str(source.dtype or "default").replace("torch.", "")},
        "package_version": package_version(), "git_commit": git_commit(),
        "device": device_name(source.device), "torch": torch.__version__, "python": platform.python_version(),
    }


class RunStore:
    """The examples of one run, on disk (see the module doc); `None` folder: in memory only."""

    def __init__(self, folder: str | Path | None, task: str, settings: dict, env: dict, restart: bool = False):
        self.folder = Path(folder) if folder is not None else None
        self.task, self.settings, self.env = task, settings, env
        self.done: dict[str, dict] = {}
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path, lines = self.folder / "run.json", self.folder / "examples.jsonl"
        if restart:
            for p in (meta_path, lines, self.folder / "results.json"):
                p.unlink(missing_ok=True)
        if meta_path.is_file():
            self._check_same_run(json.loads(meta_path.read_text()))
            self.done = self._read_examples(lines)
        else:
            meta = {"task": task, "settings": settings, **env}
            write_bytes_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())

    def _check_same_run(self, meta: dict) -> None:
        ours = {"task": self.task, "settings": self.settings, "config_hash": self.env["model"]["config_hash"]}
        theirs = {"task": meta.get("task"), "settings": meta.get("settings"),
                  "config_hash": meta.get("model", {}).get("config_hash")}
        # Settings written to JSON and read back (tuples become lists): compare in that form.
        ours = json.loads(json.dumps(ours))
        if ours != theirs:
            diff = [k for k in ours if ours[k] != theirs[k]]
            if "settings" in diff:
                keys = sorted(set(ours["settings"]) | set(theirs["settings"] or {}))
                diff = [f"settings.{k}" for k in keys if ours["settings"].get(k) != (theirs["settings"] or {}).get(k)]
            raise RunFolderError(f"{self.folder} holds another run (different {', '.join(diff)}): "
                                 "use another --out folder, or --restart to discard it")

    @staticmethod
    def _read_examples(path: Path) -> dict[str, dict]:
        done: dict[str, dict] = {}
        if not path.is_file():
            return done
        raw, pos = path.read_bytes(), 0
        while (nl := raw.find(b"\n", pos)) >= 0:   # a last piece without a newline was never finished
            line = raw[pos:nl]
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break   # cut short by a kill: it and anything after it are redone
                done[rec["key"]] = rec
            pos = nl + 1
        if pos < len(raw):
            with path.open("r+b") as f:
                f.truncate(pos)
        return done

    def has(self, key: str) -> bool:
        return key in self.done

    def add(self, record: dict) -> None:
        """Record one finished example (its `key` must be new), durably before returning."""
        if record["key"] in self.done:
            raise ValueError(f"example {record['key']!r} is already recorded")
        self.done[record["key"]] = record
        if self.folder is None:
            return
        with (self.folder / "examples.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        return sorted(self.done.values(), key=lambda r: r.get("index", 0))

    def write_results(self, results: dict) -> Path | None:
        if self.folder is None:
            return None
        path = self.folder / "results.json"
        write_bytes_atomic(path, (json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())
        return path

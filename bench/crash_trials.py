"""Crash trials (issue 14 item 2): `save_pretrained` killed with SIGKILL at random points.

Two models A and B (B = A plus a few injections) take turns saving into one folder that also
holds the user's own files. Each trial forks a child that saves the other model into the folder,
and kills it with SIGKILL after a random delay drawn uniformly over 0 … 1.25 × the median time a
child takes from fork to the end of its save (so some kills land before or after the save, most
inside it). Then the folder must load,
and every tensor must equal A's or B's exactly (the old or the new complete checkpoint, never a
mix), and the user's files must be untouched. Saves alternate between one file and several
shards, so kills also land while stale shards are removed. Each trial records where the kill
landed, from what the folder held before the next load repaired it: nothing of the save yet, the
staging folder only (before the commit point), the commit journal (after it: the load completes
the commit), or the save had already completed.

`--what memory` runs the same trials on memory saves (`save_memory`: the memory alone, one
file beside the user's files) and checks `read_memory` gives A's or B's memory exactly.

    python bench/crash_trials.py                      # CI size: 200 trials on a ~6 MB checkpoint
    python bench/crash_trials.py --trials 2000 --size full --json bench/results/crash-trials.json
    python bench/crash_trials.py --what memory --trials 200

Prints one JSON object (also written to --json): trials, outcomes (old / new), where the kills
landed, and failures (must be 0). Exit code 1 when any trial fails.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from script_io import emit, in_scratch

import mplus_fast
from mplus_fast import atomic
from mplus_fast.checkpoint import load_checkpoint
from mplus_fast.memories import MEMORY_FILE, read_memory
from mplus_fast.testing import FIRST_PLAIN_ID, make_random_checkpoint

SIZES = {
    "ci": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, num_tokens=16, num_blocks=12, num_ltm_blocks=2, ltm_initial_size=64,
               selector_hidden_dim=32, update_ltm_frequency=4, initial_rf_when_moving_stm_to_ltm=3),
    "full": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, num_tokens=16, num_blocks=12, num_ltm_blocks=2, ltm_initial_size=64,
                 selector_hidden_dim=32, update_ltm_frequency=4, initial_rf_when_moving_stm_to_ltm=3),
}
USER_FILES = {"README.md": "# my model\n", "tokenizer.json": '{"model": {}}', "notes/results.csv": "a,b\n1,2\n"}


def models(work: Path, size: str):
    ckpt = make_random_checkpoint(work / "source", seed=0, **SIZES[size])
    a = mplus_fast.load(ckpt, seed=0)
    b = mplus_fast.load(ckpt, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):   # past a merge: B's LTM, pending buffer and ages differ from A's
        b.inject_memory(torch.randint(FIRST_PLAIN_ID, b.config.vocab_size, (1, 20), generator=g), update_memory=True)
    return a, b


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def same(t: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> bool:
    return t.keys() == ref.keys() and all(t[k].dtype == ref[k].dtype and torch.equal(t[k], ref[k]) for k in ref)


def plant(folder: Path) -> None:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def user_files_intact(folder: Path) -> bool:
    return all((folder / n).is_file() and (folder / n).read_text() == t for n, t in USER_FILES.items())


def landed(folder: Path) -> str:
    """Where the last kill landed, from the leftovers (read before a load repairs them)."""
    names = [p.name for p in folder.iterdir()]
    if atomic.JOURNAL in names:
        return "after the commit point"
    if any(n.startswith(atomic.STAGING_PREFIX) or n.startswith(atomic.TMP_PREFIX) for n in names):
        return "before the commit point"
    return "before the save wrote anything"


class Checkpoint:
    """save_pretrained into the folder, one file or several shards; load_checkpoint back."""
    def __init__(self, folder: Path):
        self.folder = folder

    def tensors_of(self, model):
        return model.state_tensors()

    def save(self, model, shard_bytes: int | None):
        model.save_pretrained(self.folder, **({"max_shard_size": shard_bytes} if shard_bytes else {}))

    def load(self):
        return load_checkpoint(self.folder)[1]


class MemoryFile(Checkpoint):
    """save_memory to memory.safetensors in the folder; read_memory back."""
    def tensors_of(self, model):
        return model.snapshot().tensors

    def save(self, model, shard_bytes: int | None):
        model.save_memory(self.folder / MEMORY_FILE)

    def load(self):
        return read_memory(self.folder / MEMORY_FILE).tensors


def save_in_child(subject, model, shard_bytes: int | None) -> int:
    pid = os.fork()
    if pid == 0:   # the child: save, then leave at once (no atexit, no pytest teardown)
        code = 1
        try:
            torch.set_num_threads(1)
            subject.save(model, shard_bytes)
            code = 0
        finally:
            os._exit(code)
    return pid


def measure_save(subject, model, shard_bytes: int, repeats: int = 6) -> float:
    """Median time from fork to the end of a child's save: the span the kills are spread over."""
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        os.waitpid(save_in_child(subject, model, shard_bytes if i % 2 else None), 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(trials: int, size: str, seed: int, work: Path, what: str = "checkpoint") -> dict:
    rng = random.Random(seed)
    a, b = models(work, size)
    target = work / "target"
    plant(target)
    subject = (MemoryFile if what == "memory" else Checkpoint)(target)
    if what == "memory":
        a.save_pretrained(target)   # a checkpoint folder that also keeps a memory file
    ref = {"A": fingerprint(subject.tensors_of(a)), "B": fingerprint(subject.tensors_of(b))}
    shard_bytes = max(1, sum(t.numel() * t.element_size() for t in ref["A"].values()) // 5)
    save_s = measure_save(subject, a, shard_bytes)
    holds = "A"
    outcomes = {"old": 0, "new": 0}
    where: dict[str, int] = {}
    failures: list[str] = []
    t_start = time.perf_counter()
    done = 0
    for i in range(trials):
        new = "B" if holds == "A" else "A"
        delay = rng.uniform(0, 1.25 * save_s)
        pid = save_in_child(subject, b if new == "B" else a, shard_bytes if rng.random() < 0.5 else None)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)   # no-op on a child that already finished
        _, status = os.waitpid(pid, 0)
        finished = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        spot = "after the save completed" if finished else landed(target)
        where[spot] = where.get(spot, 0) + 1
        try:
            tensors = subject.load()
        except Exception as exc:   # a trial that does not load is a failure, whatever the error
            failures.append(f"trial {i}: the folder does not load after a kill {delay * 1e3:.1f} ms in: {exc!r}")
            break
        got = next((k for k in ("A", "B") if same(tensors, ref[k])), None)
        if got is None:
            failures.append(f"trial {i}: the folder holds neither the old nor the new checkpoint (a mix)")
            break
        if finished and got != new:
            failures.append(f"trial {i}: the save finished but the folder holds the old checkpoint")
        if not user_files_intact(target):
            failures.append(f"trial {i}: the user's files changed")
            break
        outcomes["old" if got == holds else "new"] += 1
        holds = got
        done += 1
    return {"what": what, "trials": done, "size": size, "seed": seed, "saved_bytes": sum(
        t.numel() * t.element_size() for t in ref["A"].values()), "median_save_in_child_ms": round(save_s * 1e3, 1),
        "outcomes": outcomes, "kills_landed": where, "failures": failures, "seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__, "python": sys.version.split()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--size", choices=sorted(SIZES), default="ci")
    ap.add_argument("--what", choices=["checkpoint", "memory"], default="checkpoint",
                    help="save_pretrained (the checkpoint) or save_memory (the memory file alone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = in_scratch("mplus-crash-", args.work, lambda work: run(args.trials, args.size, args.seed, work, args.what))
    emit(result, args.json)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak (issue 14 item 1): many injections with periodic saves, watching for slow leaks.

For each configuration (reference backend; fast backend with the LTM bank on the device; fast
with it on the host, served by the prefetch engine) a small model (the demo geometry: 4 layers,
hidden 128, T = 16, a merge every 4 injections) takes `--injections` injections of T random
tokens, with a read (a 32-token forward) every 10 and a save into one folder every
`--save-every`. After a warm-up (the first 10%, at least 200 injections: the LTM bank has reached
its steady size and every buffer, thread and file handle has been made once) it checks:

- the LTM bank never grows past its bound from the config (`max_ltm_tokens`, or R when the
  removal rule keeps R rows, plus rows loaded with the checkpoint);
- resident memory (RSS) stays within 5% of its level after the warm-up;
- the numbers of open file descriptors and of threads never exceed their level after the warm-up;
- a reload of the last save continues exactly: the saved and the running model take the same 20
  further injections and reads, and end with identical state tensors and logits.

    python bench/soak.py                                 # CI size: 400 injections per configuration
    python bench/soak.py --injections 10000 --json bench/results/soak-cpu.json   # the full run

Prints one JSON object (also written to --json); exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

import torch
from script_io import emit, in_scratch

import mplus_fast
from mplus_fast.demo import DEMO_CONFIG
from mplus_fast.testing import FIRST_PLAIN_ID, make_random_checkpoint

CONFIGS = {"reference": dict(backend="reference"), "fast": dict(backend="fast"),
           "fast-host": dict(backend="fast", ltm_placement="host")}
RSS_GROWTH_LIMIT = 0.05
READ_EVERY = 10
CONTINUE = 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def ltm_bound(model, loaded_rows: int) -> int:
    c = model.config
    return max(c.max_ltm_tokens, c.ltm_retrieved) + loaded_rows


def chunk(model, g: torch.Generator, n: int | None = None) -> torch.Tensor:
    return torch.randint(FIRST_PLAIN_ID, model.config.vocab_size, (1, n or model.config.num_tokens), generator=g)


def probe() -> dict:
    gc.collect()
    return {"rss": rss_bytes(), "fds": open_fds(), "threads": os_threads(), "py_threads": threading.active_count()}


def soak_one(name: str, ckpt: Path, work: Path, injections: int, save_every: int, seed: int) -> dict:
    kw = CONFIGS[name]
    model = mplus_fast.load(ckpt, seed=seed, **kw)
    loaded_rows = max(model.memory_stats()["ltm_tokens_per_layer"] or [0])
    bound = ltm_bound(model, loaded_rows)
    g = torch.Generator().manual_seed(seed)
    prompt = chunk(model, g, 32)
    target = work / f"saved-{name}"
    warmup = min(injections, max(200, injections // 10))
    base = None
    peak = {"rss": 0, "fds": 0, "threads": 0, "py_threads": 0}
    samples, ltm_max, merges, saves = [], 0, 0, 0
    t0 = time.perf_counter()
    for i in range(1, injections + 1):
        model.inject_memory(chunk(model, g), update_memory=True)
        merges += bool(getattr(model.last_update, "merged", False))
        ltm_max = max(ltm_max, max(model.memory_stats()["ltm_tokens_per_layer"] or [0]))
        if i % READ_EVERY == 0:
            model(prompt)
        if i % save_every == 0 or i == injections:
            model.save_pretrained(target)
            saves += 1
        if i == warmup:
            base = probe()
        if i % max(1, injections // 50) == 0 or i == injections:
            now = probe()
            samples.append({"injection": i, "rss_mb": round(now["rss"] / 2**20, 2), "ltm_tokens_layer0":
                            model.memory_stats()["ltm_tokens_per_layer"][0] if model.config.is_mplus else 0})
            if base is not None:
                peak = {k: max(peak[k], now[k]) for k in peak}
    seconds = time.perf_counter() - t0
    result = {"config": name, **kw, "injections": injections, "saves": saves, "merges": merges, "seconds": round(seconds, 1),
              "ms_per_injection": round(1e3 * seconds / injections, 2), "warmup_injections": warmup,
              "ltm_tokens_max": ltm_max, "ltm_bound": bound,
              "rss_mb_after_warmup": round(base["rss"] / 2**20, 2), "rss_mb_peak_after_warmup": round(peak["rss"] / 2**20, 2),
              "rss_growth": round(peak["rss"] / base["rss"] - 1, 4),
              "fds_after_warmup": base["fds"], "fds_peak": peak["fds"], "threads_after_warmup": base["threads"],
              "threads_peak": peak["threads"], "samples": samples}
    result["reload_continues_exactly"] = reload_continues(model, target, kw, seed)
    checks = {"ltm bounded": ltm_max <= bound, "rss flat": result["rss_growth"] < RSS_GROWTH_LIMIT,
              "no fd leak": peak["fds"] <= base["fds"], "no thread leak": peak["threads"] <= base["threads"],
              "reload continues exactly": result["reload_continues_exactly"]}
    result["failed_checks"] = [k for k, ok in checks.items() if not ok]
    return result


def reload_continues(model, target: Path, kw: dict, seed: int) -> bool:
    """The last save, reloaded, and the running model take the same next steps identically."""
    again = mplus_fast.load(target, **kw)
    g1, g2 = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    same = True
    for _ in range(CONTINUE):
        a, b = chunk(model, g1), chunk(again, g2)
        model.inject_memory(a, update_memory=True)
        again.inject_memory(b, update_memory=True)
        same &= torch.equal(model(a).logits, again(b).logits)
    sa, sb = model.state_tensors(), again.state_tensors()
    return bool(same and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--injections", type=int, default=400)
    ap.add_argument("--save-every", type=int, default=None, help="default: every 5%% of the injections")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo model is fastest on 1)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    save_every = args.save_every or max(1, args.injections // 20)
    def soak_all(work: Path) -> dict:
        ckpt = make_random_checkpoint(work / "source", seed=args.seed, **DEMO_CONFIG)
        return {"runs": [soak_one(n, ckpt, work, args.injections, save_every, args.seed) for n in names]}
    runs = in_scratch("mplus-soak-", args.work, soak_all)["runs"]
    result = {"injections_per_config": args.injections, "save_every": save_every, "threads": args.threads,
              "rss_growth_limit": RSS_GROWTH_LIMIT, "torch": torch.__version__, "python": sys.version.split()[0],
              "runs": runs, "failed": {r["config"]: r["failed_checks"] for r in runs if r["failed_checks"]}}
    emit(result, args.json)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

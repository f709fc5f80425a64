"""Scaling curves: prefill and decode time against LTM size and prompt length, both backends.

    python -m bench.scaling [--layers 2] [--out bench/results/scaling-cpu]

Uses the "CPU mid" widths (hidden 1024, 16/4 heads, MLP 2816, vocab 32,000, T 64, STM 2,560,
R 640) with fewer layers (default 2) so a 150k-token bank per layer fits this machine's memory
and minutes; time per layer is what scales. Writes <out>.json and, when matplotlib is
installed, <out>.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.bench_engine import MID
from mplus_fast.config import MPlusConfig
from mplus_fast.model import MPlus
from mplus_fast.testing import _config_dict, random_tensors

LTM_SIZES = (1_000, 5_000, 20_000, 50_000, 150_000)
PROMPTS = (8, 32, 128, 512)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: MPlus, n: int, repeats: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        prefill = timed(lambda: model.backend.read(ids, valid, cache_extra=8, last_only=True), repeats)
        cache = model.backend.read(ids, valid, cache_extra=repeats + 8, last_only=True).cache
        decode = timed(lambda: model.backend.decode_step(cache, torch.tensor([5])), repeats)
    return {"prefill_ms": prefill * 1e3, "decode_ms": decode * 1e3}


def build(layers: int, ltm: int, backend: str) -> MPlus:
    cfg = MPlusConfig.from_dict(_config_dict({**MID, "num_hidden_layers": layers}))
    return MPlus(cfg, random_tensors(cfg, seed=0, ltm_size=ltm, weight_std=0.02), backend=backend, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/scaling-cpu")
    args = ap.parse_args()
    rows = []
    for backend in ("reference", "fast"):
        for ltm in LTM_SIZES:
            model = build(args.layers, ltm, backend)
            rows.append({"backend": backend, "ltm": ltm, "prompt": 32, **measure(model, 32, args.repeats)})
            print(rows[-1], flush=True)
            if ltm == 20_000:
                for n in PROMPTS:
                    rows.append({"backend": backend, "ltm": ltm, "prompt": n, **measure(model, n, args.repeats)})
                    print(rows[-1], flush=True)
            del model
    meta = {"layers": args.layers, "geometry": "CPU mid widths", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, meta, out.with_suffix(".png"))


def plot(rows, meta, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: JSON only")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend, style in (("reference", "--o"), ("fast", "-o")):
        by_ltm = sorted((r for r in rows if r["backend"] == backend and r["prompt"] == 32), key=lambda r: r["ltm"])
        by_ltm = list({r["ltm"]: r for r in by_ltm}.values())
        axes[0].plot([r["ltm"] for r in by_ltm], [r["prefill_ms"] for r in by_ltm], style, label=f"{backend} prefill (32 tok)")
        axes[0].plot([r["ltm"] for r in by_ltm], [r["decode_ms"] for r in by_ltm], style, label=f"{backend} decode / token")
        by_n = sorted((r for r in rows if r["backend"] == backend and r["ltm"] == 20_000), key=lambda r: r["prompt"])
        by_n = list({r["prompt"]: r for r in by_n}.values())
        axes[1].plot([r["prompt"] for r in by_n], [r["prefill_ms"] for r in by_n], style, label=f"{backend} prefill")
    axes[0].set(xscale="log", yscale="log", xlabel="LTM tokens per layer", ylabel="ms", title="vs LTM size")
    axes[1].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms", title="prefill vs prompt (LTM 20k)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"mplus_fast CPU scaling, {meta['layers']} layers of CPU-mid width, {meta['threads']} threads, torch {meta['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

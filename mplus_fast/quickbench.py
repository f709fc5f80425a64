"""`mplus-fast bench`: quick wall-clock timings of one backend on one checkpoint (median of a few
repeats, device-synchronised), and optionally a torch.profiler chrome trace of one more round,
in which the package's `nvtx_range` / record_function ranges appear by name.

The phases time exactly what the public API runs: `inject_memory(update_memory=True)` for one
chunk of T tokens; a prompt prefill with the KV cache that generation uses (backend.read with
cache_extra, last_only); and cached decode steps (backend.decode_step), as `generate` does.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from rich.table import Table

import mplus_fast
from mplus_fast.cliutil import CLIError, Timer, console, fmt_bytes, peak_rss_bytes
from mplus_fast.profiling import nvtx_range
from mplus_fast.testing import FIRST_PLAIN_ID


def _round(model, prompt: torch.Tensor, chunk: torch.Tensor, new_tokens: int) -> dict[str, float]:
    dev = model.device
    with nvtx_range("bench.inject"), Timer(dev) as t_inj:
        model.inject_memory(chunk, update_memory=True)
    valid = torch.ones_like(prompt, dtype=torch.bool)
    with torch.inference_mode():
        with nvtx_range("bench.prefill"), Timer(dev) as t_pre:
            res = model.backend.read(prompt, valid, cache_extra=new_tokens, last_only=True)
        tok = res.logits[:, -1].argmax(-1)
        with nvtx_range("bench.decode"), Timer(dev) as t_dec:
            for _ in range(new_tokens):
                tok = model.backend.decode_step(res.cache, tok).argmax(-1)
    return {"inject": t_inj.s, "prefill": t_pre.s, "decode": t_dec.s / max(new_tokens, 1)}


def run_bench(ckpt: str | None, prompt_len: int, new_tokens: int, repeats: int, seed: int, device: str, dtype,
              profile: str | None, backend: str = "fast") -> dict[str, float]:
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise CLIError("--prompt-len, --new-tokens and --repeats must all be at least 1")
    if ckpt is None:
        from mplus_fast.demo import demo_checkpoint
        path, _ = demo_checkpoint(seed)
        console.print(f"checkpoint: random demo checkpoint {path}")
    else:
        path = Path(ckpt)
    with Timer(device) as t_load:
        model = mplus_fast.load(path, device=device, dtype=dtype, seed=seed, backend=backend)
    c = model.config
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(FIRST_PLAIN_ID, c.vocab_size, (1, prompt_len), generator=g).to(model.device)
    chunk = torch.randint(FIRST_PLAIN_ID, c.vocab_size, (1, c.num_tokens), generator=g).to(model.device)
    _round(model, prompt, chunk, new_tokens)  # warm-up (allocations, caches)
    rounds = [_round(model, prompt, chunk, new_tokens) for _ in range(repeats)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}

    tab = Table(title=f"{model!r}\nbackend={model.backend_name}, median of {repeats}, threads={torch.get_num_threads()}",
                title_justify="left")
    for col in ("phase", "tokens", "median ms", "tokens/s"):
        tab.add_column(col, justify="right" if col != "phase" else "left")
    tab.add_row("load", "", f"{1e3 * t_load.s:.1f}", "")
    tab.add_row("inject + update (1 chunk)", str(c.num_tokens), f"{1e3 * med['inject']:.2f}", f"{c.num_tokens / med['inject']:.0f}")
    tab.add_row(f"prefill (prompt, P={c.read_prefix_len} memory prefix)", str(prompt_len), f"{1e3 * med['prefill']:.2f}",
                f"{prompt_len / med['prefill']:.0f}")
    tab.add_row(f"decode (per token, {new_tokens} steps)", "1", f"{1e3 * med['decode']:.2f}", f"{1 / med['decode']:.0f}")
    console.print(tab)
    console.print(f"peak RSS: {fmt_bytes(peak_rss_bytes())}")

    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if model.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            _round(model, prompt, chunk, new_tokens)
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(profile))
        console.print(f"chrome trace written to {profile} (open in chrome://tracing or ui.perfetto.dev; "
                      "ranges bench.*, reference.read.layerN, reference.inject.layerN)")
    return med

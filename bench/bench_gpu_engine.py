"""The fast engine at the released geometry on a GPU (issue 4): prefill, decode and peak memory,
with the LTM bank on the device and on the host.

No checkpoint is needed: `mplus_fast.testing.random_model` draws a released-size model on the GPU
(32 layers, hidden 4,096, bf16, STM 10,240 + R 2,560 per layer) with a synthetic bank of 153,600
LTM tokens per layer (random K/V rows and retrieval keys; see docs/fast_engine.md). One model per
placement at a time: both would not fit together. Every timed call ends with a CUDA
synchronisation. `extra_info` holds the device, versions, geometry, the targets and whether each
was met, and the physical floors (docs/fast_engine.md: ≈12 TFLOP per 512-token prefill; a decode
step reads ~15 GB of weights + ~1.7 GB of cached K/V).

    MPLUS_FAST_BENCH_SIZE=released pytest bench/bench_gpu_engine.py --benchmark-only \\
        --benchmark-json=bench-gpu.json          # a CUDA machine; a few minutes (not yet run on one)

With `MPLUS_FAST_BENCH_SIZE=small` (the default) a tiny geometry runs on the CPU, so CI's untimed
run (`--benchmark-disable`) exercises the same code; any other size needs CUDA (skipped without).
"""
from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass

import pytest
import torch

from bench.bench_engine import SMALL, decode_bytes, prefill_flops
from bench.conftest import SIZE, sync
from mplus_fast import decoding
from mplus_fast.config import MPlusConfig
from mplus_fast.decoding import decoder_cache
from mplus_fast.testing import RELEASED_LTM_TOKENS, RELEASED_MPLUS, _config_dict, random_model

RELEASED = SIZE != "small"
DEVICE = "cuda" if RELEASED else "cpu"
GEOMETRY, LTM_TOKENS = (RELEASED_MPLUS, RELEASED_LTM_TOKENS) if RELEASED else (SMALL, 300)
PROMPT, NEW_TOKENS = (512, 32) if RELEASED else (16, 4)
ROUNDS = dict(prefill=5, decode=32, generate=3) if RELEASED else dict(prefill=2, decode=4, generate=1)
PLACEMENTS = ("device", "host")
# Issue 4's targets on an H100, and the H100 rates PERF.md's floors assume.
TARGET_PREFILL_MS = {"device": 20.0, "host": 30.0}
TARGET_DECODE_MS = 6.5
TARGET_PEAK_GB_HOST = 21.0
H100_BF16_FLOPS, H100_HBM_BYTES_PER_S = 800e12, 3.35e12
GB = 1e9

pytestmark = pytest.mark.skipif(RELEASED and not torch.cuda.is_available(),
                                reason=f"MPLUS_FAST_BENCH_SIZE={SIZE}: the released-geometry engine benchmark needs "
                                       "a CUDA device (MPLUS_FAST_BENCH_SIZE=small runs a tiny geometry on the CPU)")


@dataclass
class Built:
    """The model of one placement and what building it cost. Timed calls read `model` from here,
    so the fixture's teardown can drop the only reference and free the GPU for the next one."""
    model: object
    placement: str
    build_s: float
    build_peak_gb: float | None
    resident_gb: float | None


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_gb(stat) -> float | None:
    return stat() / GB if DEVICE == "cuda" else None


def config() -> MPlusConfig:
    return MPlusConfig.from_dict(_config_dict(dict(GEOMETRY)))


@pytest.fixture(scope="module", params=PLACEMENTS)
def built(request):
    """pytest groups the tests by placement; the previous model is torn down before the next is built."""
    release()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = random_model(config(), device=DEVICE, dtype=torch.bfloat16, ltm_tokens=LTM_TOKENS,
                         ltm_placement=request.param)
    sync(DEVICE)
    holder = Built(model, request.param, time.perf_counter() - t0, gpu_gb(torch.cuda.max_memory_allocated),
                   gpu_gb(torch.cuda.memory_allocated))
    del model
    yield holder
    holder.model = None
    release()


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config().vocab_size, (1, PROMPT), generator=g).to(DEVICE)
    return ids, torch.ones_like(ids, dtype=torch.bool)


MEDIANS: dict[tuple[str, str], float] = {}  # (test, placement) -> median seconds, for derived figures


def median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None and getattr(stats, "stats", None) is not None else None


def record(benchmark, built: Built, **info) -> None:
    c = built.model.config
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "size": SIZE, "dtype": "bfloat16", "placement": built.placement,
        "geometry": {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                     "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim, "mlp": c.intermediate_size,
                     "vocab": c.vocab_size, "stm": c.stm_size, "retrieved": c.ltm_retrieved,
                     "selector": c.selector_hidden_dim, "lora_r": c.lora_config["r"]},
        "ltm_tokens_per_layer": LTM_TOKENS, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
        "build_s": built.build_s, "build_peak_gpu_gb": built.build_peak_gb, "resident_gpu_gb": built.resident_gb,
        "peak_rss_gb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, **info})


def verdict(benchmark, name: str, value: float | None, target: float, unit: str = "ms") -> None:
    """extra_info["targets"][name]: the value, the target and whether it was met (None: an untimed
    run, or the tiny geometry, to which the targets do not apply)."""
    met = value <= target if RELEASED and value is not None else None
    benchmark.extra_info.setdefault("targets", {})[name] = {"value": value, "target": target, "unit": unit, "met": met}


# ---------------------------------------------------------------------- benchmarks
def test_prefill(benchmark, built, prompt):
    """One 512-token prompt over the memory: retrieval, LTM fetch, attention, logits of the last position."""
    ids, valid = prompt
    flops = prefill_flops(built.model.config, PROMPT, LTM_TOKENS)
    record(benchmark, built, flops=flops, floor_tflop=flops / 1e12,
           floor_ms_at_800_tflops=flops / H100_BF16_FLOPS * 1e3, floor_perf_md="≈12 TFLOP → ≈12–15 ms on an H100")

    def run():
        built.model.backend.read(ids, valid, cache_extra=NEW_TOKENS, last_only=True)
        sync(DEVICE)

    with torch.inference_mode():
        benchmark.pedantic(run, rounds=ROUNDS["prefill"], warmup_rounds=2 if RELEASED else 1)
    t = median_s(benchmark)
    if t is not None:
        MEDIANS["prefill", built.placement] = t
        benchmark.extra_info["achieved_tflops"] = flops / t / 1e12
    verdict(benchmark, "prefill", t and t * 1e3, TARGET_PREFILL_MS[built.placement])


def test_decode_step_eager(benchmark, built, prompt):
    """One eager `decode_step` (bs 1) against the cache of a 512-token prefill, synchronised: the
    plain loop's step (the reference backend's, and the fast one's when RoPE changes mid-call),
    not what `generate` runs on a GPU (see test_decode_per_token)."""
    ids, valid = prompt
    model, warmup = built.model, 2
    with torch.inference_mode():
        cache = model.backend.read(ids, valid, cache_extra=ROUNDS["decode"] + warmup, last_only=True).cache
        nbytes = decode_bytes(model, cache.length[0])
        record(benchmark, built, bytes=nbytes, floor_gb=nbytes / GB)
        tok = torch.tensor([7], device=DEVICE)

        def run():
            built.model.backend.decode_step(cache, tok)
            sync(DEVICE)

        benchmark.pedantic(run, rounds=ROUNDS["decode"], warmup_rounds=warmup)


def timed_generate(model, ids, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    sync(DEVICE)
    return time.perf_counter() - t0


def captures(model) -> int:
    """CUDA graphs captured by the decoders `generate` keeps for reuse (decoding.DecoderCache)."""
    return sum(d.captures for d in decoder_cache(model.backend).entries.values())


def test_decode_per_token(benchmark, built, prompt):
    """Decode per token as `generate` runs it: the StaticDecoder's step, on a GPU the CUDA graph
    captured by the first call of this shape and replayed by every later call. Per token =
    (generate of 2k tokens − generate of k tokens) / k, both shapes captured before timing, so
    the prefill cancels out; the capture (with its warm-up steps) is timed on its own:
    `capture_s` = first call of a shape − the median later call of it."""
    ids, _ = prompt
    model, k = built.model, NEW_TOKENS
    with torch.inference_mode():
        nbytes = decode_bytes(model, model.backend.read(ids, torch.ones_like(ids, dtype=torch.bool), cache_extra=2 * k,
                                                        last_only=True).cache.length[0])
    first_long = timed_generate(model, ids, 2 * k)       # captures the 2k shape
    timed_generate(model, ids, k)                         # captures the k shape
    before = captures(model)
    rounds = max(ROUNDS["generate"], 5)    # a difference of two medians: a few rounds each
    short = sorted(timed_generate(model, ids, k) for _ in range(rounds))[rounds // 2]
    benchmark.pedantic(lambda: timed_generate(model, ids, 2 * k), rounds=rounds, warmup_rounds=0)
    long = median_s(benchmark)
    per_token_ms = (long - short) / k * 1e3 if long is not None else None
    record(benchmark, built, bytes=nbytes, floor_gb=nbytes / GB, floor_ms_at_3_35_tbps=nbytes / H100_HBM_BYTES_PER_S * 1e3,
           floor_perf_md="weights ~15 GB + K/V ~1.7 GB read → ≈5 ms/token",
           decode_per_token_ms=per_token_ms, generate_k_ms=short * 1e3, k=k,
           capture_s=first_long - long if long is not None and before else None,
           captures_before_timing=before, captures_while_timing=captures(model) - before,
           graphs=decoding.graphs_enabled(torch.device(DEVICE)))
    if long is not None and per_token_ms:
        benchmark.extra_info["achieved_gbps"] = nbytes / (per_token_ms / 1e3) / GB
    verdict(benchmark, "decode_per_token", per_token_ms, TARGET_DECODE_MS)


def test_generate(benchmark, built, prompt):
    """`model.generate(max_new_tokens=32)` end to end: prefill, then 31 decode steps (greedy, no
    eos), the shape's decoder captured by the warm-up call and reused."""
    ids, _ = prompt
    record(benchmark, built)

    def run():
        built.model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
        sync(DEVICE)

    benchmark.pedantic(run, rounds=ROUNDS["generate"], warmup_rounds=1)
    t = median_s(benchmark)
    benchmark.extra_info["per_token_ms_with_prefill"] = t and t / NEW_TOKENS * 1e3


def test_peak_memory(benchmark, built, prompt):
    """Peak GPU memory of a prefill + 32 decode steps on the built model (the peak counter is reset
    after building; build peak and resident memory are recorded apart)."""
    ids, valid = prompt
    record(benchmark, built)

    def run():
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cache = built.model.backend.read(ids, valid, cache_extra=NEW_TOKENS, last_only=True).cache
        tok = torch.tensor([7], device=DEVICE)
        for _ in range(NEW_TOKENS):
            built.model.backend.decode_step(cache, tok)
        sync(DEVICE)

    with torch.inference_mode():
        benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    peak = gpu_gb(torch.cuda.max_memory_allocated)
    benchmark.extra_info["peak_gpu_gb"] = peak
    benchmark.extra_info["peak_gpu_reserved_gb"] = gpu_gb(torch.cuda.max_memory_reserved)
    if built.placement == "host":
        verdict(benchmark, "peak_gpu", peak, TARGET_PEAK_GB_HOST, unit="GB")

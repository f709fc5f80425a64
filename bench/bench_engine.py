"""Engine benchmarks: reference vs fast backend in the same run (prefill, decode, inject+update).

Each records, in extra_info, the FLOPs (or bytes) the fast path cannot avoid, this machine's
floors measured in the same run (bench/conftest.py), and the achieved fraction of the floor.
Run the issue's "CPU mid" geometry with `MPLUS_FAST_BENCH_SIZE=mid pytest bench/bench_engine.py
--benchmark-only --benchmark-json=bench/results/<name>.json`.
"""
from __future__ import annotations

import resource

import psutil
import pytest
import torch

from bench.conftest import SIZE
from mplus_fast.config import MPlusConfig
from mplus_fast.model import MPlus
from mplus_fast.testing import _config_dict, random_tensors

MID = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
           intermediate_size=2816, vocab_size=32000, num_tokens=64, num_blocks=50, num_ltm_blocks=10,
           selector_hidden_dim=64, update_ltm_frequency=60, initial_rf_when_moving_stm_to_ltm=10,
           lora_config={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "inference_mode": True,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]})
SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=256, vocab_size=512, num_tokens=8, num_blocks=10, num_ltm_blocks=2,
             selector_hidden_dim=16, update_ltm_frequency=4, initial_rf_when_moving_stm_to_ltm=3)
GEOMETRY, LTM = (MID, 20_000) if SIZE == "mid" else (SMALL, 300)
PROMPTS = (32, 128) if SIZE == "mid" else (8, 32)
INJECT = 512 if SIZE == "mid" else 48
BACKENDS = ("reference", "fast")


def config() -> MPlusConfig:
    return MPlusConfig.from_dict(_config_dict(dict(GEOMETRY)))


@pytest.fixture(scope="module")
def models():
    cfg = config()
    tensors = random_tensors(cfg, seed=0, ltm_size=LTM, weight_std=0.02)
    out, rss = {}, {}
    for b in BACKENDS:
        before = psutil.Process().memory_info().rss
        out[b] = MPlus(cfg, tensors, backend=b, seed=0)
        rss[b] = psutil.Process().memory_info().rss - before
    return out, rss


# ---------------------------------------------------------------------- floors
def layer_linear_flops(c: MPlusConfig, rows: int) -> float:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return 2 * rows * c.hidden_size * (q + 2 * kv + q + 3 * c.intermediate_size)


def retrieval_flops(c: MPlusConfig, n: int, keys: int) -> float:
    s = c.selector_hidden_dim
    return 2 * n * c.hidden_size * 2 * s + 2 * n * 2 * s * s + 2 * n * s * keys


def prefill_flops(c: MPlusConfig, n: int, ltm: int) -> float:
    """What a prefill with cached memory K/V cannot avoid: the prompt's projections and MLP,
    attention over the whole prefix, retrieval scoring, the last position's logits."""
    attn = 4 * n * (c.read_prefix_len + n / 2) * c.num_attention_heads * c.head_dim
    per_layer = layer_linear_flops(c, n) + attn + (retrieval_flops(c, n, ltm) if c.is_mplus else 0)
    return c.num_hidden_layers * per_layer + 2 * c.hidden_size * c.vocab_size


def inject_flops(c: MPlusConfig, m: int) -> float:
    """One injection of m tokens: the tokens through every layer (encoder adapter), attention over
    [bos | T memory | causal tail], plus the update's K/V and retrieval keys of 2T rows."""
    kv = c.num_key_value_heads * c.head_dim
    attn = 4 * m * (1 + c.num_tokens + m / 2) * c.num_attention_heads * c.head_dim
    update = 2 * c.num_tokens * c.hidden_size * 2 * kv + 2 * c.num_tokens * c.hidden_size * 2 * c.selector_hidden_dim
    return c.num_hidden_layers * (layer_linear_flops(c, m) + attn + update)


def decode_bytes(model: MPlus, cached_rows: int) -> float:
    """One decode step reads every weight of the decoder once plus the KV cache."""
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv + q + 3 * c.intermediate_size) + 2 * c.hidden_size
    weights = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size + c.hidden_size
    cache = c.num_hidden_layers * cached_rows * 2 * kv
    return (weights + cache) * model.weights.embed.element_size()


def record(benchmark, floors, model, **info):
    benchmark.extra_info.update({"backend": model.backend_name, "size": SIZE, "threads": floors["threads"],
                                 "machine_matmul_gflops": floors["matmul_flops"] / 1e9,
                                 "machine_read_gbps": floors["read_bytes_per_s"] / 1e9,
                                 "peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info})


def fraction(benchmark, floor_seconds: float) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["floor_ms"] = floor_seconds * 1e3
        benchmark.extra_info["times_floor"] = stats.stats.median / floor_seconds


# ---------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", PROMPTS)
def test_prefill(benchmark, models, machine_floors, backend, n):
    model = models[0][backend]
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    valid = torch.ones_like(ids, dtype=torch.bool)
    flops = prefill_flops(model.config, n, LTM)
    record(benchmark, machine_floors, model, prompt=n, flops=flops, build_rss_mb=models[1][backend] / 2**20)
    with torch.inference_mode():
        benchmark.pedantic(lambda: model.backend.read(ids, valid, cache_extra=16, last_only=True), rounds=5, warmup_rounds=1)
    fraction(benchmark, flops / machine_floors["matmul_flops"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode(benchmark, models, machine_floors, backend):
    model = models[0][backend]
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    valid = torch.ones_like(ids, dtype=torch.bool)
    steps = 20
    with torch.inference_mode():
        cache = model.backend.read(ids, valid, cache_extra=steps + 2, last_only=True).cache
        tok = torch.tensor([7])
        shared = cache.shared[0][0].shape[2] if cache.shared else 0      # [bos | STM], attended in place
        nbytes = decode_bytes(model, cache.length[0] + shared)
        record(benchmark, machine_floors, model, bytes=nbytes)
        benchmark.pedantic(lambda: model.backend.decode_step(cache, tok), rounds=steps, warmup_rounds=1)
    fraction(benchmark, nbytes / machine_floors["read_bytes_per_s"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate(benchmark, models, machine_floors, backend):
    """`generate` end to end (32-token prompt, 16 greedy tokens): prefill plus the decode loop the
    user gets (the fast backend's static decoder, the reference's per-token loop)."""
    model = models[0][backend]
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    new = 16
    record(benchmark, machine_floors, model, prompt=32, new_tokens=new)
    benchmark.pedantic(lambda: model.generate(ids, max_new_tokens=new, eos_token_id=[]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inject_with_update(benchmark, models, machine_floors, backend):
    model = models[0][backend]
    ctx = torch.randint(3, model.config.vocab_size, (1, INJECT), generator=torch.Generator().manual_seed(2))
    flops = inject_flops(model.config, INJECT)
    record(benchmark, machine_floors, model, tokens=INJECT, flops=flops)
    benchmark.pedantic(lambda: model.inject_memory(ctx, update_memory=True), rounds=3, warmup_rounds=1)
    fraction(benchmark, flops / machine_floors["matmul_flops"])

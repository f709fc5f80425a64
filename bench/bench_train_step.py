"""One fine-tuning step (adapters + retriever, base frozen) through the reference path: time and
the memory autograd keeps for the backward, measured at a small geometry and extrapolated to
the released 8B on a GPU.

    python -m bench.bench_train_step                 # measure at MEASURE, print the 8B estimate
    pytest bench/bench_train_step.py                 # CI: the tiny shape, once, untimed

The step is the training loop's (`mplus_fast.training.loop.StageRun.one_step`): `injections`
contexts of T tokens (the facts with a graph), one read of `rows` questions, the answer loss +
the retriever BCE, backward, AdamW on the trainable tensors.

Extrapolation (documented in docs/training.md): the FLOPs of a step are counted from the
geometry (every projection of every token the reference computes: injections over
1 + T + m positions, reads over 1 + R + N + n per row, backward ≈ 2 × forward for the frozen
base (input gradients only) + the adapters), and the time on a GPU is those FLOPs at an assumed
sustained bf16 rate. Memory = bf16 weights + float32 masters and AdamW moments of the trainable
tensors + the saved activations, whose bytes per (layer × position × hidden) are measured here
and scaled to the released geometry.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch

from mplus_fast.config import MPlusConfig
from mplus_fast.model import MPlus
from mplus_fast.testing import RELEASED_MPLUS, random_tensors

MEASURE = dict(architectures=["MPlus"], vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_tokens=64, num_blocks=10, num_ltm_blocks=2,
               selector_hidden_dim=64, num_selector_layers=2, update_ltm_frequency=4, initial_rf_when_moving_stm_to_ltm=4, ltm_initial_size=256,
               lora_config={"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]})
TINY = {**MEASURE, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_tokens": 8, "ltm_initial_size": 32, "selector_hidden_dim": 16}
GPU_BF16_FLOPS = 400e12     # sustained dense bf16 on an H100/H200-class GPU (~40% of peak)


@dataclass
class Episode:
    injections: int = 4
    facts: int = 2
    rows: int = 4
    row_tokens: int = 24


def step_flops(c: MPlusConfig, ep: Episode) -> float:
    """Forward + backward FLOPs of one step of the reference path (matmuls only)."""
    d, L, T = c.hidden_size, c.num_hidden_layers, c.num_tokens
    kv = 2 * c.num_key_value_heads * c.head_dim * d                    # k, v projections
    rest = 2 * c.num_attention_heads * c.head_dim * d + 3 * d * c.intermediate_size   # q, o, mlp
    sel = 2 * (d * 2 * c.selector_hidden_dim + 2 * c.selector_hidden_dim ** 2)
    attn = lambda q, k: 4 * q * k * c.num_attention_heads * c.head_dim
    inject = L * (kv * (1 + 2 * T) + rest * T + attn(T, 1 + 2 * T))
    prefix = 1 + c.ltm_retrieved + c.stm_size
    n = ep.row_tokens
    read = ep.rows * L * (kv * (prefix + n) + rest * n + attn(n, prefix + n) + sel * n) + 2 * ep.rows * n * d * c.vocab_size
    forward = 2 * (ep.injections * inject + read)
    graph = 2 * (ep.facts * inject + read)                               # backward through what has a graph
    return forward + 2 * graph


def run_step(raw: dict, ep: Episode, dtype=torch.float32, seed: int = 0) -> dict:
    from mplus_fast.training import objectives as obj
    from mplus_fast.training.trainable import TrainableMPlus
    c = MPlusConfig.from_dict(dict(raw))
    model = MPlus(c, random_tensors(c, seed, weight_std=0.02), backend="reference", dtype=dtype, seed=seed)
    tm = TrainableMPlus(model, ("adapters", "retriever"))
    params = [m for ms in tm.masters.values() for m in ms.master]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    T = c.num_tokens
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def once():
        tm.detach_memory()
        saved[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sources = []
            for i in range(ep.injections):
                sources.append(tm.next_injection_id())
                tm.write(tm.inject(torch.randint(3, c.vocab_size, (T,), generator=g), grad=i < ep.facts))
            rows = [obj.ReadRow("qa", torch.randint(3, c.vocab_size, (ep.row_tokens - 4,), generator=g).tolist(),
                                [5, 6, 7, 2], sources[b % ep.facts]) for b in range(ep.rows)]
            batch = obj.make_batch(rows, 0)
            inputs = {}
            res = tm.read(batch.ids, batch.valid, retrieve=True, query_mask=batch.query_mask,
                          observe=lambda l, x: inputs.__setitem__(l, x))
            s, k = obj.token_loss(res.logits, batch.targets)
            bce, _ = obj.retriever_loss(tm, inputs, batch)
            loss = s / k + (bce if bce is not None else 0)
        opt.zero_grad()
        loss.backward()
        for ms in tm.masters.values():
            ms.grads_to_master()
        opt.step()
        for ms in tm.masters.values():
            ms.sync()

    once()                                   # warm-up (and the LTM/pending fill)
    t0 = time.perf_counter()
    once()
    seconds = time.perf_counter() - t0
    positions = ep.facts * (1 + 2 * T) + ep.rows * (1 + c.ltm_retrieved + c.stm_size + ep.row_tokens)
    return {"seconds": seconds, "saved_bytes": saved[0], "flops": step_flops(c, ep),
            "saved_bytes_per_layer_position_hidden": saved[0] / (c.num_hidden_layers * positions * c.hidden_size),
            "trainable_params": sum(m.numel() for m in params)}


def estimate_released(measured: dict, ep: Episode) -> dict:
    """The released 8B geometry (bf16 compute, float32 masters) from a measured step."""
    c = MPlusConfig.from_dict(dict(RELEASED_MPLUS))
    T = c.num_tokens
    positions = ep.facts * (1 + 2 * T) + ep.rows * (1 + c.ltm_retrieved + c.stm_size + ep.row_tokens)
    # float32 measurement → bf16 activations: half the bytes per element
    activations = measured["saved_bytes_per_layer_position_hidden"] / 2 * c.num_hidden_layers * positions * c.hidden_size
    from mplus_fast.weights import expected_weight_shapes
    weights = sum(torch.Size(s).numel() for s in expected_weight_shapes(c).values()) * 2
    lora = sum(torch.Size(s).numel() for k, s in expected_weight_shapes(c).items()
               if ".lora_" in k or "self_attn.query_proj" in k or "self_attn.key_proj" in k)
    memory = c.num_hidden_layers * c.stm_size * c.hidden_size * 2 + c.num_hidden_layers * 153_600 * (c.hidden_size + 256) * 2
    flops = step_flops(c, ep)
    return {"flops": flops, "gpu_seconds": flops / GPU_BF16_FLOPS, "weights_gb": weights / 1e9,
            "trainable_params": lora, "optimizer_gb": lora * 4 * 4 / 1e9, "activations_gb": activations / 1e9,
            "memory_state_gb": memory / 1e9,
            "total_gb": (weights + lora * 16 + activations + memory) / 1e9}


def test_train_step_runs(benchmark):
    """CI: one step at the tiny shape (pytest-benchmark, once untimed with --benchmark-disable)."""
    out = benchmark.pedantic(run_step, args=(TINY, Episode(rows=2, row_tokens=8)), rounds=1, iterations=1)
    assert out["saved_bytes"] > 0 and out["flops"] > 0
    est = estimate_released(out, Episode())
    assert est["weights_gb"] > 15 and est["gpu_seconds"] > 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    ep = Episode()
    measured = run_step(MEASURE, ep)
    print(json.dumps({"measured": MEASURE | {"episode": ep.__dict__}, **measured,
                      "cpu_gflops": measured["flops"] / measured["seconds"] / 1e9,
                      "released_8b_estimate": estimate_released(measured, ep)}, indent=2, default=str))

"""Switching memories on one model: `restore` of a snapshot that carries the fast backend's K/V
(nothing projected) against a restore that recomputes them from the hidden rows (a memory read
from disk, or made by another model), and the reference backend's restore, in the same run.

Small geometry in CI (untimed); `MPLUS_FAST_BENCH_SIZE=mid`: hidden 1,024, 8 layers, STM 1,024 and
8,192 LTM rows per layer.
"""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from bench.conftest import SIZE
from mplus_fast.memories import Memory
from mplus_fast.testing import make_random_checkpoint

GEOMETRY = {
    "small": dict(ltm_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, num_tokens=16, num_blocks=8, num_ltm_blocks=2,
                  selector_hidden_dim=16, vocab_size=256),
    "mid": dict(ltm_size=8192, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=128, num_tokens=64, num_blocks=16, num_ltm_blocks=4,
                selector_hidden_dim=64, vocab_size=1000),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("switch") / "ckpt", seed=0, **GEOMETRY.get(SIZE, GEOMETRY["mid"]))


@pytest.mark.parametrize("mode", ["kept_kv", "recomputed_kv", "reference"])
def test_restore(benchmark, ckpt, mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = mplus_fast.load(ckpt, backend="reference" if mode == "reference" else "fast")
        memory = model.snapshot()
        if mode == "recomputed_kv":
            memory = Memory(memory.tensors, memory.fingerprint, memory.summary)   # as read from a file
        c = model.config
        benchmark.extra_info.update(stm_rows=c.stm_size, ltm_rows=GEOMETRY.get(SIZE, GEOMETRY["mid"])["ltm_size"],
                                    layers=c.num_hidden_layers, hidden=c.hidden_size, memory_bytes=memory.nbytes,
                                    kv_bytes=memory.stats()["derived_bytes"], threads=1)
        benchmark(model.restore, memory)
    finally:
        torch.set_num_threads(threads)

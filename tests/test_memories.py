"""Memories apart from the weights: snapshot / restore / fork / reset / save / load, on both backends."""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from mplus_fast.memories import MemoryMismatchError, read_memory
from mplus_fast.testing import make_random_checkpoint

PROMPT = torch.arange(5, 17)[None]


def chunk(seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (9,), generator=torch.Generator().manual_seed(seed))


def test_two_memories_on_one_set_of_weights_continue_exactly(tiny_ckpt, backend):
    """Alternating two memories on one model equals two models each with its own memory."""
    model = mplus_fast.load(tiny_ckpt, seed=0, backend=backend)
    alone_a, alone_b = (mplus_fast.load(tiny_ckpt, seed=0, backend=backend) for _ in range(2))
    a = model.snapshot()
    b = a.fork()
    weights = model.weights.embed
    for i in range(6):                      # enough injections for merges (update_ltm_frequency = 2)
        for mem, alone, seed in ((a, alone_a, i), (b, alone_b, 100 + i)):
            model.restore(mem)
            model.inject_memory(chunk(seed), update_memory=True)
            alone.inject_memory(chunk(seed), update_memory=True)
            new = model.snapshot()
            mem.tensors = new.tensors
            assert torch.equal(model(PROMPT).logits, alone(PROMPT).logits)
    assert model.weights.embed is weights   # the weights were never reloaded
    model.restore(a)
    assert torch.equal(model(PROMPT).logits, alone_a(PROMPT).logits)
    assert not torch.equal(alone_a(PROMPT).logits, alone_b(PROMPT).logits)


def test_save_load_reset_and_sizes(tiny_ckpt, backend, tmp_path):
    model = mplus_fast.load(tiny_ckpt, seed=0, backend=backend)
    base = model(PROMPT).logits
    for i in range(3):
        model.inject_memory(chunk(i), update_memory=True)
    after = model(PROMPT).logits
    path = model.save_memory(tmp_path / "alice.safetensors")
    (tmp_path / "notes.txt").write_text("mine")
    weights_file = tiny_ckpt / "model.safetensors"
    before = weights_file.read_bytes()
    model.reset()
    assert torch.equal(model(PROMPT).logits, base)
    model.load_memory(path)
    assert torch.equal(model(PROMPT).logits, after)
    assert weights_file.read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    mem = read_memory(path)
    stats = mem.stats()
    assert stats["injections"] == 3 and stats["stm_tokens_per_layer"] == model.config.stm_size
    assert stats["bytes"] == mem.nbytes > 0
    # the next injection draws the same drops as it would have without the round trip
    twin = mplus_fast.load(tiny_ckpt, seed=0, backend=backend)
    for i in range(3):
        twin.inject_memory(chunk(i), update_memory=True)
    model.inject_memory(chunk(9), update_memory=True)
    twin.inject_memory(chunk(9), update_memory=True)
    assert torch.equal(model(PROMPT).logits, twin(PROMPT).logits)


def test_a_memory_of_another_model_is_refused_and_nothing_changes(tiny_ckpt, tmp_path, backend):
    other = mplus_fast.load(make_random_checkpoint(tmp_path / "other", seed=1, hidden_size=64), seed=0, backend=backend)
    model = mplus_fast.load(tiny_ckpt, seed=0, backend=backend)
    before = model(PROMPT).logits
    foreign = other.save_memory(tmp_path / "foreign.safetensors")
    with pytest.raises(MemoryMismatchError, match="belongs to another model.*hidden 64"):
        model.load_memory(foreign)
    assert torch.equal(model(PROMPT).logits, before)
    with pytest.raises(mplus_fast.CheckpointError, match="not a mplus_fast memory file"):
        model.load_memory(tiny_ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="memory file not found"):
        model.load_memory(tmp_path / "missing.safetensors")
    assert torch.equal(model(PROMPT).logits, before)


def test_a_memory_moves_between_backends_and_dtypes(tiny_ckpt, tmp_path):
    ref = mplus_fast.load(tiny_ckpt, seed=0, backend="reference")
    for i in range(3):
        ref.inject_memory(chunk(i), update_memory=True)
    path = ref.save_memory(tmp_path / "m")                      # a folder: memory.safetensors inside
    assert (tmp_path / "m" / "memory.safetensors").is_file()
    fast = mplus_fast.load(tiny_ckpt, seed=0, backend="fast")
    fast.load_memory(tmp_path / "m")
    torch.testing.assert_close(fast(PROMPT).logits, ref(PROMPT).logits, rtol=1e-5, atol=1e-5)
    bf16 = mplus_fast.load(tiny_ckpt, seed=0, dtype=torch.bfloat16)
    bf16.load_memory(path)                                       # cast to the model's dtype
    assert bf16.memory_stats()["injections"] == 3

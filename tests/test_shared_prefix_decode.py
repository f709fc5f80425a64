"""Decode over the batch-shared [bos | STM] prefix in place (its attention merged with each
sequence's own cache by log-sum-exp) against the copied-prefix decode it replaced: the split
attention alone, then the fast backend's decode steps at batch 1 and with left padding."""
from __future__ import annotations

import pytest
import torch

import mplus_fast
from conftest import rel_err
from mplus_fast.backends.dispatch import decode_attention, split_decode_attention
from mplus_fast.kvcache import KVCache
from mplus_fast.ops.decode import decode_attention_lse, decode_attention_reference


def parts(B, Hq=4, Hkv=2, D=16, shared=37, own=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    valid = torch.ones(B, own, dtype=torch.bool)
    for b in range(B):
        valid[b, : 2 * b] = False           # left padding, more for later sequences
        valid[b, own - 3 + b % 2:] = False  # unwritten slots
    return r(B, Hq, 1, D), r(1, Hkv, shared, D), r(1, Hkv, shared, D), r(B, Hkv, own, D), r(B, Hkv, own, D), valid


def copied(ks, vs, k, v, valid):
    """The previous layout: the shared rows copied in front of every sequence's cache."""
    B = k.shape[0]
    kk = torch.cat([ks.expand(B, -1, -1, -1), k], dim=2)
    vv = torch.cat([vs.expand(B, -1, -1, -1), v], dim=2)
    return kk, vv, torch.cat([torch.ones(B, ks.shape[2], dtype=torch.bool), valid], dim=1)


@pytest.mark.parametrize("B", [1, 3])
def test_split_attention_equals_attention_over_the_copied_prefix(B):
    q, ks, vs, k, v, valid = parts(B)
    want = decode_attention_reference(q, *copied(ks, vs, k, v, valid), 0.25)
    got = split_decode_attention(q, k, v, valid, ks, vs, 0.25)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) < 1e-6
    # the engine's choice: on the CPU the native kernel attends both parts in one pass
    native = decode_attention(q, k, v, valid, 0.25, (ks, vs))
    assert native.shape == want.shape and native.dtype == want.dtype
    assert rel_err(native, want) < 1e-6


def test_split_attention_bf16_error_budget():
    """bf16: the error against an fp32 truth within 2x that of the same-precision SDPA decode."""
    q, ks, vs, k, v, valid = parts(3, dtype=torch.bfloat16, seed=1)
    full = copied(ks, vs, k, v, valid)
    truth = decode_attention_reference(q.float(), full[0].float(), full[1].float(), full[2], 0.25)
    same_precision = rel_err(decode_attention_reference(q, *full, 0.25).float(), truth)
    got = split_decode_attention(q, k, v, valid, ks, vs, 0.25)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), truth) <= 2 * same_precision + 1e-3


def test_lse_part_of_a_sequence_with_no_valid_key_is_empty():
    q, _, _, k, v, valid = parts(2)
    valid[1] = False
    out, lse = decode_attention_lse(q, k, v, valid, 0.25)
    assert torch.isneginf(lse[1]).all() and not out[1].any() and torch.isfinite(out[0]).all()


# ---------------------------------------------------------------------- the engine
def prepared(ckpt_factory, **kw):
    model = mplus_fast.load(ckpt_factory(seed=8), seed=1, backend="fast", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):                       # a non-empty pending buffer, merged rows in the LTM
        model.inject_memory(torch.randint(3, 96, (1, 6), generator=g), update_memory=True)
    return model


def with_copied_prefix(cache: KVCache) -> KVCache:
    """The same cache in the layout before the shared prefix was attended in place."""
    k, v, valid = zip(*(copied(ks, vs, cache.k[l], cache.v[l], cache.valid[l])
                        for l, (ks, vs) in enumerate(cache.shared)))
    P = cache.shared[0][0].shape[2]
    return KVCache(list(k), list(v), [n + P for n in cache.length], list(valid), cache.next_pos.clone())


@pytest.mark.parametrize("seqs", [[[5, 17, 33, 2, 71]], [[5, 17, 33, 2, 71, 9, 10], [44, 45], [90, 1, 3, 7, 11]]])
def test_decode_over_the_shared_prefix_equals_the_copied_prefix_decode(ckpt_factory, seqs):
    model = prepared(ckpt_factory)
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    valid = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], valid[i, n - len(s):] = torch.tensor(s), True
    res = model.backend.read(ids, valid, cache_extra=4, last_only=True)
    shared, old = res.cache, with_copied_prefix(res.cache)
    assert len(shared.shared) == model.config.num_hidden_layers and not old.shared
    # the per-sequence cache no longer holds the 1 + N shared rows
    assert old.k[0].shape[2] - shared.k[0].shape[2] == 1 + model.config.stm_size
    tok = res.logits[:, -1].argmax(-1)
    for _ in range(4):
        a, b = model.backend.decode_step(shared, tok), model.backend.decode_step(old, tok)
        assert rel_err(a, b) < 1e-5
        tok = a.argmax(-1)


def test_a_cache_made_before_a_memory_update_refuses_to_decode(ckpt_factory):
    """The shared prefix is rebuilt in place after an update; an older cache would read the new
    memory under its old prompt, so it is refused."""
    model = prepared(ckpt_factory)
    ids = torch.tensor([[5, 17, 33]])
    res = model.backend.read(ids, torch.ones_like(ids, dtype=torch.bool), cache_extra=2, last_only=True)
    model.inject_memory(torch.tensor([[7, 8, 9, 10, 11, 12]]), update_memory=True)
    model(ids)                                                  # the read that rebuilds the prefix
    with pytest.raises(RuntimeError, match="prefill again"):
        model.backend.decode_step(res.cache, res.logits[:, -1].argmax(-1))


def test_the_rotated_prefix_is_rebuilt_in_place(ckpt_factory):
    """One buffer for the backend's life: a captured decode step keeps reading the current memory."""
    model = prepared(ckpt_factory)
    model(torch.tensor([[5, 6, 7]]))
    k, version = model.backend.shared.k, model.backend.shared.version
    before = k.clone()
    model.inject_memory(torch.tensor([[7, 8, 9, 10, 11, 12]]), update_memory=True)
    model(torch.tensor([[5, 6, 7]]))
    assert model.backend.shared.k is k and model.backend.shared.version == version + 1
    assert not torch.equal(before, k)

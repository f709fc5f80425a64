"""Decoding for the fast backend (SPEC §4): one token per sequence through every layer against
the static cache that the prefill built (`decoding.StaticDecoder` captures `decode_forward`)."""
from __future__ import annotations

import torch

from mplus_fast import layers as L_
from mplus_fast.backends.dispatch import decode_attention, decode_matmul
from mplus_fast.kvcache import KVCache
from mplus_fast.rope import engine_rope as apply_rope   # the native kernel where measured faster


def decode_step(eng, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One cached step for tokens (B,); returns float32 logits (B, V)."""
    if cache.shared:
        eng.shared.check(cache.shared_version)
    pos = cache.next_pos[:, None]
    inv_freq = eng.m.rope.inv_freq_for(int(pos.max())).to(tokens.device)
    slot = torch.full((1,), cache.length[0], dtype=torch.int64, device=tokens.device)
    logits = decode_forward(eng, cache, tokens, pos, slot, inv_freq)
    cache.advance()
    return logits


def decode_forward(eng, cache: KVCache, tokens, pos, slot, inv_freq, x=None) -> torch.Tensor:
    """Tokens (B,) at positions pos (B, 1) through every layer, their k/v written at cache
    slot `slot` ((1,) tensor); float32 logits (B, V). Every input is a tensor already on the
    device and nothing reads back to the host, so `decoding.StaticDecoder` can capture it in
    a CUDA graph; attention runs over the whole static cache, unwritten slots masked, and over
    the batch-shared [bos | STM] prefix in place (`cache.shared`), merged by log-sum-exp. `x`:
    the tokens' embeddings (B, 1, d) when the caller looked them up (a host-resident table
    cannot be read inside a graph); else they are looked up here."""
    m, c = eng.m, eng.cfg
    x = eng.embed(tokens)[:, None] if x is None else x
    for l in range(c.num_hidden_layers):
        fused = eng.dec[l]
        q, k, v = eng.split_qkv(fused.qkv(eng.norm(l, x), decode_matmul))
        q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
        cache.write(l, slot, k, v)
        shared = cache.shared[l] if cache.shared else None
        attn = decode_attention(q, cache.k[l], cache.v[l], cache.valid[l], eng.scale, shared)
        x = eng.layer_rest(l, fused, x, attn, decode_matmul)
    x = L_.rms_norm(x[:, 0], m.weights.final_norm, c.rms_norm_eps)
    return decode_matmul(x, eng.lm_head_t).float()

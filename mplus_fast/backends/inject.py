"""Injection for the fast backend (SPEC §5, the write's forward): a context through the encoder
adapter against the cached [bos | last T STM] prefix; only the context's own tokens (and, for a
short context, the last STM rows it queries) are projected."""
from __future__ import annotations

import torch

from mplus_fast import layers as L_
from mplus_fast.backends.dispatch import attention
from mplus_fast.profiling import nvtx_range
from mplus_fast.rope import engine_rope as apply_rope   # the native kernel where measured faster


def inject(eng, ids: torch.Tensor) -> torch.Tensor:
    """New memory (L, T, d) from one context (m,). Queried rows: the last T−m STM tokens
    (when m < T) then the context; the rest of [bos | last T STM] is the cached prefix."""
    m, c = eng.m, eng.cfg
    T, mlen = c.num_tokens, ids.shape[0]
    lead = max(T - mlen, 0)               # STM rows that are queried (only when m < T)
    p_len = 1 + T - lead                  # = 1 + min(T, m)
    inv_freq = m.rope.inv_freq_for(T + mlen)
    q_pos = torch.arange(p_len, T + mlen + 1, device=ids.device)
    x = eng.embed(ids)[None]
    stm = eng.store.stm
    deltas = []
    for l in range(c.num_hidden_layers):
        with nvtx_range(f"fast.inject.layer{l}"):
            fused = eng.enc[l]
            k_pre, v_pre = injection_prefix(eng, l, inv_freq)
            rows = x
            if lead:  # a short context: the last `lead` STM tokens are queried too
                queried = stm.rows("hidden", l, slice(c.stm_size - lead, None), x.device)
                rows = torch.cat([queried[None].to(x.dtype), x], dim=1)
            rows = torch.cat([rows[:, :-T], rows[:, -T:] + m.weights.new_memory_pos], dim=1)
            q, k_t, v_t = eng.split_qkv(fused.qkv(eng.norm(l, rows)))
            q, k_t = apply_rope(q, q_pos, inv_freq), apply_rope(k_t, q_pos, inv_freq)
            k = torch.cat([k_pre[:, :, :p_len], k_t], dim=2)
            v = torch.cat([v_pre[:, :, :p_len], v_t], dim=2)
            attn = attention(q, k, v, L_.prefix_causal_mask(rows.shape[1], p_len, None, ids.device))
            y = eng.layer_rest(l, fused, rows, attn)
            deltas.append(y[0, -T:])
            x = y[:, -mlen:]
    return torch.stack(deltas)


def injection_prefix(eng, l, inv_freq):
    """Encoder-adapter K/V (post-RoPE) of [bos | last T STM tokens] at positions 0..T, cached on
    the backend until the next update."""
    cached = eng._enc_prefix[l]
    if cached is not None and torch.equal(cached[0], inv_freq):
        return cached[1], cached[2]
    T, stm = eng.cfg.num_tokens, eng.store.stm
    rows = stm.rows("hidden", l, slice(-T, None), eng.m.device)
    kv = torch.cat([eng.bos_enc[l], eng.kv_rows(l, rows, eng.enc)])      # (1+T, 2, Hkv, D)
    k = kv[:, 0].transpose(0, 1)[None]                                     # (1, Hkv, 1+T, D)
    v = kv[:, 1].transpose(0, 1)[None]
    k = apply_rope(k, torch.arange(T + 1, device=k.device), inv_freq)
    eng._enc_prefix[l] = (inv_freq.clone(), k, v)
    return k, v

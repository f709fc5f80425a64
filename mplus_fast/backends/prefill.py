"""Reading for the fast backend (SPEC §3): a prompt's prefill over [bos | LTM | STM | prompt]
without building that sequence. Per layer: the prompt's fused QKV, retrieval (started fetch of
the chosen K/V rows), attention in two exact parts merged by log-sum-exp — [bos | STM | prompt]
first, against the batch-shared cached [bos | STM] keys, while the LTM rows are still being
fetched, then the R fetched rows rotated on load — o-proj and MLP; the decode cache when asked
(its per-sequence part only: [LTM rows | prompt]; decode attends [bos | STM] in place)."""
from __future__ import annotations

import torch

from mplus_fast import layers as L_
from mplus_fast.backends import retrieve as ret
from mplus_fast.backends.result import ReadResult
from mplus_fast.kvcache import KVCache
from mplus_fast.ops.attention import memory_attention, merge_attention_states
from mplus_fast.profiling import nvtx_range
from mplus_fast.rope import engine_rope as apply_rope   # the native kernel where measured faster


def read(eng, ids, valid, *, cache_extra: int | None = None, last_only: bool = False,
         retrieve: bool = True) -> ReadResult:
    m, c = eng.m, eng.cfg
    B, n = ids.shape
    dev = ids.device
    R = c.ltm_retrieved
    use_memory = eng.store.initialized
    P = c.read_prefix_len if use_memory else 0
    in_pos = P + (valid.long().cumsum(1) - 1).clamp(min=0)
    inv_freq = m.rope.inv_freq_for(int(in_pos.max()))
    ltm_pos = torch.arange(1, R + 1, device=dev)
    x = eng.embed(ids)
    cache = KVCache([], [], [], [], in_pos[:, -1] + 1) if cache_extra is not None else None
    if cache is not None and use_memory:
        eng.shared.get(eng, inv_freq)                 # built now if stale: the version the cache reads
        cache.shared_version = eng.shared.version
    all_idx, all_prov = [], []
    for l in range(c.num_hidden_layers):
        with nvtx_range(f"fast.read.layer{l}"):
            fused = eng.dec[l]
            h = eng.norm(l, x)
            q, k_t, v_t = eng.split_qkv(fused.qkv(h))
            q, k_t = apply_rope(q, in_pos, inv_freq), apply_rope(k_t, in_pos, inv_freq)
            if use_memory:
                idx = ret.retrieve(eng, l, h, valid) if retrieve else torch.empty(B, 0, dtype=torch.int64, device=dev)
                fetch = ret.fetch_kv(eng, l, idx) if idx.numel() else None           # started, not awaited
                attn, rows = prefill_attention(eng, l, q, k_t, v_t, valid, fetch, ltm_pos, inv_freq)
                all_idx.append(idx.cpu())
                all_prov.append(ret.provenance(eng, l, idx) if idx.numel() else idx.cpu())
            else:
                rows = None
                empty = k_t[:1, :, :0]
                attn, _ = memory_attention(q, empty, empty, None, None, None, k_t, v_t, valid, eng.scale)
                all_idx.append(torch.empty(B, 0, dtype=torch.int64))
                all_prov.append(torch.empty(B, 0, dtype=torch.int64))
            x = eng.layer_rest(l, fused, x, attn)
            if cache is not None:
                shared = shared_prefix(eng, l, inv_freq) if use_memory else None
                cache.add_layer(*full_prefix(eng, l, rows, k_t, v_t, valid, ltm_pos, inv_freq), cache_extra, shared)
    x = L_.rms_norm(x[:, -1:] if last_only else x, m.weights.final_norm, c.rms_norm_eps)
    return ReadResult((x @ eng.lm_head_t).float(), all_idx, all_prov, cache)


def shared_prefix(eng, l, inv_freq):
    """[bos | STM] keys (rotated) and values of layer l, shared by the whole batch: (1, Hkv, 1+N, D)."""
    return eng.shared.layer(eng, l, inv_freq)


def prefill_attention(eng, l, q, k_t, v_t, valid, fetch, ltm_pos, inv_freq):
    """Attention over [bos | LTM rows | STM | prompt] in two exact parts merged by log-sum-exp:
    [bos | STM | prompt] first, which needs no retrieval result and so runs while the LTM rows
    are still being fetched, then the R gathered LTM rows, rotated on load. Returns the
    attention output and the fetched rows (B, R, 2, Hkv, D) or None."""
    k_s, v_s = shared_prefix(eng, l, inv_freq)
    out, lse = memory_attention(q, k_s, v_s, None, None, None, k_t, v_t, valid, eng.scale)
    if fetch is None:
        return out, None
    rows = fetch()
    k_l = rows[:, :, 0].transpose(1, 2).contiguous()                      # (B, Hkv, R, D) pre-RoPE
    v_l = rows[:, :, 1].transpose(1, 2).contiguous()
    no_tail = torch.zeros_like(valid)
    out_l, lse_l = memory_attention(q, k_l, v_l, None, ltm_pos, inv_freq, k_t, v_t, no_tail, eng.scale)
    return merge_attention_states(out, lse, out_l, lse_l)[0], rows


def full_prefix(eng, l, rows, k_t, v_t, valid, ltm_pos, inv_freq):
    """Keys (rotated) and values of the per-sequence part of the decode cache, [LTM rows | prompt],
    as parts, and the key validity (B, S). The batch-shared [bos | STM] is not copied into it:
    decode attends it in place (`KVCache.shared`)."""
    B = k_t.shape[0]
    k_parts, v_parts = [], []
    if rows is not None:
        k_parts.append(apply_rope(rows[:, :, 0].transpose(1, 2), ltm_pos, inv_freq))
        v_parts.append(rows[:, :, 1].transpose(1, 2))
    p_len = sum(k.shape[2] for k in k_parts)
    key_valid = torch.cat([torch.ones(B, p_len, dtype=torch.bool, device=k_t.device), valid], dim=1)
    return k_parts + [k_t], v_parts + [v_t], key_valid

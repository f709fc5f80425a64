"""The reference backend: M+ exactly as the authors' code computes it, in plain PyTorch.

Every prompt rebuilds, per layer, the sequence [bos | retrieved LTM rows | STM | prompt] and
projects all of it (SPEC §3) — the cost the fast backend removes. It is the truth every fast path
is measured and checked against, and it runs on any device torch supports.
"""
from __future__ import annotations

import torch

from mplus_fast import layers as F_
from mplus_fast.kvcache import KVCache
from mplus_fast.backends.result import ReadResult
from mplus_fast.memory import MemoryState, UpdateRecord
from mplus_fast.profiling import nvtx_range
from mplus_fast.retrieval import select_ltm_rows
from mplus_fast.rope import apply_rope
from mplus_fast.store import MemoryStore, NoDerived, base_layout, bytes_by_device, update
from mplus_fast.weights import reading_adapter, writing_adapter


class ReferenceBackend:
    name = "reference"

    def __init__(self, model, state: MemoryState):
        self.m = model
        self.load_state(state)

    # ------------------------------------------------------------------ the memory (mplus_fast.store)
    def load_state(self, state: MemoryState) -> None:
        """Make `state` the memory (copied into the store, every column on the compute device)."""
        layout = base_layout(self.cfg, self.m.dtype, self.m.device)
        self.store = MemoryStore.from_state(state, self.cfg, layout, NoDerived(self.retrieval_keys))

    @property
    def state(self) -> MemoryState:
        """The memory in the reference layout: views of the store (valid until the next update)."""
        return self.store.view()

    @state.setter
    def state(self, state: MemoryState) -> None:
        self.load_state(state)

    def memory_state(self) -> MemoryState:
        return self.store.view()

    def memory_bytes_by_device(self) -> dict:
        return bytes_by_device(self.store.nbytes())

    def memory_bytes(self) -> dict:
        return self.store.nbytes()

    def counts(self) -> dict:
        st = self.store
        return {"ltm_sizes": st.ltm_sizes(), "pending": st.pending_len(), "update_step": st.update_step,
                "injections": st.next_injection_id, "initialized": st.initialized}

    def update(self, delta: torch.Tensor) -> UpdateRecord:
        """SPEC §5 by the store's one update; an error leaves the memory as it was."""
        return update(self.store, delta, self.m.generator, NoDerived(self.retrieval_keys), self.m.age_mode)

    # ------------------------------------------------------------------ helpers
    @property
    def cfg(self):
        return self.m.config

    def _qkv(self, layer, h_all: torch.Tensor, n_query: int, adapter):
        c = self.cfg
        q = F_.split_heads(layer.proj["q_proj"](h_all[:, h_all.shape[1] - n_query:], adapter), c.num_attention_heads, c.head_dim)
        k = F_.split_heads(layer.proj["k_proj"](h_all, adapter), c.num_key_value_heads, c.head_dim)
        v = F_.split_heads(layer.proj["v_proj"](h_all, adapter), c.num_key_value_heads, c.head_dim)
        return q, k, v

    def _finish_layer(self, layer, residual, attn_out, adapter):
        c = self.cfg
        x = residual + torch.nn.functional.linear(F_.merge_heads(attn_out), layer.o_proj)
        return x + F_.mlp(layer, F_.rms_norm(x, layer.post_norm, c.rms_norm_eps), adapter, c.hidden_act)

    def retrieval_keys(self, l: int, rows: torch.Tensor) -> torch.Tensor:
        """key_proj(input_layernorm(rows)): the 256-d retrieval key of memory tokens of layer l."""
        layer = self.m.weights.layers[l]
        return F_.selector(layer.selectors["key_proj"], F_.rms_norm(rows, layer.input_norm, self.cfg.rms_norm_eps), self.cfg.hidden_act)

    def _retrieve(self, l: int, x: torch.Tensor, valid: torch.Tensor, state: MemoryState, retrieve: bool = True):
        """Per sequence: (B, R') indices in placement order and the rows themselves (B, R', d).
        Nothing is retrieved with `retrieve=False` (STM-only reads) or an empty LTM."""
        c, layer = self.cfg, self.m.weights.layers[l]
        R = c.ltm_retrieved
        if R == 0 or not retrieve or not state.ltm or state.ltm[l].shape[0] == 0:
            empty = torch.empty(x.shape[0], 0, dtype=torch.int64)
            return empty, empty.clone(), x.new_empty(x.shape[0], 0, x.shape[2])
        idx_all, prov_all, rows_all = [], [], []
        bank = torch.cat([state.ltm[l], state.pend[l].to(state.ltm[l].dtype)]) if state.pending_len() else state.ltm[l]
        prov = torch.cat([state.ltm_prov[l], state.pend_prov[l]]) if state.pending_len() else state.ltm_prov[l]
        for b in range(x.shape[0]):
            queries = None
            if state.ltm[l].shape[0] >= R:
                h = F_.rms_norm(x[b][valid[b]], layer.input_norm, c.rms_norm_eps)
                queries = F_.selector(layer.selectors["query_proj"], h, c.hidden_act)
            idx = select_ltm_rows(queries, state.ltm_keys[l], state.pend_keys[l], state.ltm_ages[l], state.pend_ages[l], R)
            idx_all.append(idx)
            prov_all.append(prov.cpu()[idx])
            rows_all.append(bank[idx.to(bank.device)].to(x.device, x.dtype))
        return torch.stack(idx_all), torch.stack(prov_all), torch.stack(rows_all)

    # ------------------------------------------------------------------ reading (§3)
    def read(self, ids: torch.Tensor, valid: torch.Tensor, *, cache_extra: int | None = None, last_only: bool = False,
             retrieve: bool = True, query_mask: torch.Tensor | None = None, observe=None) -> ReadResult:
        """Training hooks (`mplus_fast.training`): `query_mask` (B, n) bool limits the tokens whose
        queries choose the LTM rows (a teacher-forced question + answer retrieves by the question
        alone, as generate's prefill does); `observe(l, x)` sees each layer's input hidden states."""
        m, c, st = self.m, self.cfg, self.store.view()
        B, n = ids.shape
        dev = ids.device
        adapter = reading_adapter(c)
        use_memory = st.initialized
        R, N = c.ltm_retrieved, c.stm_size
        P = c.read_prefix_len if use_memory else 0
        # Positions of the prompt's real tokens continue after the prefix, per sequence (left padding).
        in_pos = P + (valid.long().cumsum(1) - 1).clamp(min=0)
        x = m.weights.embed[ids]
        inv_freq = m.rope.inv_freq_for(int(in_pos.max()))
        cache = KVCache([], [], [], [], in_pos[:, -1] + 1) if cache_extra is not None else None
        all_idx, all_prov = [], []
        for l, layer in enumerate(m.weights.layers):
            with nvtx_range(f"reference.read.layer{l}"):
                if observe is not None:
                    observe(l, x)
                if use_memory:
                    idx, prov, ltm_rows = self._retrieve(l, x, valid if query_mask is None else valid & query_mask, st, retrieve)
                    r_here = ltm_rows.shape[1]
                    prefix = torch.cat([m.weights.bos[l].expand(B, 1, -1), ltm_rows, st.stm[l].to(x.dtype).expand(B, -1, -1)], dim=1)
                    pre_pos = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, r_here + 1), torch.arange(R + 1, R + N + 1)]).to(dev)
                else:
                    idx = prov = torch.empty(B, 0, dtype=torch.int64)
                    prefix = x[:, :0]
                    pre_pos = torch.empty(0, dtype=torch.long, device=dev)
                all_idx.append(idx)
                all_prov.append(prov)
                seq = torch.cat([prefix, x], dim=1)
                p_len = prefix.shape[1]
                h = F_.rms_norm(seq, layer.input_norm, c.rms_norm_eps)
                q, k, v = self._qkv(layer, h, n, adapter)
                positions = torch.cat([pre_pos.expand(B, -1), in_pos], dim=1)
                q = apply_rope(q, in_pos, inv_freq)
                k = apply_rope(k, positions, inv_freq)
                key_valid = torch.cat([torch.ones(B, p_len, dtype=torch.bool, device=dev), valid], dim=1)
                mask = F_.prefix_causal_mask(n, p_len, key_valid, dev)
                out = F_.attention(q, k, v, mask)
                x = self._finish_layer(layer, x, out, adapter)
                if cache is not None:
                    cache.add_layer([k], [v], key_valid, cache_extra)
        x = F_.rms_norm(x[:, -1:] if last_only else x, m.weights.final_norm, c.rms_norm_eps)
        logits = torch.nn.functional.linear(x, m.weights.lm_head).float()
        return ReadResult(logits, all_idx, all_prov, cache)

    # ------------------------------------------------------------------ decoding (§4)
    def decode_step(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One cached step for tokens (B,); returns float32 logits (B, V)."""
        m, c = self.m, self.cfg
        adapter = reading_adapter(c)
        pos = cache.next_pos[:, None]                      # (B, 1)
        inv_freq = m.rope.inv_freq_for(int(pos.max()))
        x = m.weights.embed[tokens][:, None]               # (B, 1, d)
        for l, layer in enumerate(m.weights.layers):
            h = F_.rms_norm(x, layer.input_norm, c.rms_norm_eps)
            q, k, v = self._qkv(layer, h, 1, adapter)
            q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
            k_all, v_all, valid = cache.append(l, k, v)
            out = F_.attention(q, k_all, v_all, valid[:, None, None, :])
            x = self._finish_layer(layer, x, out, adapter)
        cache.next_pos = cache.next_pos + 1
        x = F_.rms_norm(x, m.weights.final_norm, c.rms_norm_eps)
        return torch.nn.functional.linear(x[:, 0], m.weights.lm_head).float()

    # ------------------------------------------------------------------ writing (§5)
    def inject(self, ids: torch.Tensor) -> torch.Tensor:
        """New memory (L, T, d) from one context ids (m,) (no padding), memory unchanged."""
        m, c = self.m, self.cfg
        T, mlen = c.num_tokens, ids.shape[0]
        stm_tail = self.store.stm.at("hidden", self.store.stm.order[:, -T:])  # (L, T, d): the last T STM tokens
        adapter = writing_adapter(c)
        dev = ids.device
        x = m.weights.embed[ids][None]                     # (1, m, d)
        n_query = max(mlen, T)
        positions = torch.arange(1 + T + mlen, device=dev)
        inv_freq = m.rope.inv_freq_for(T + mlen)
        deltas = []
        for l, layer in enumerate(m.weights.layers):
            with nvtx_range(f"reference.inject.layer{l}"):
                seq = torch.cat([m.weights.bos[l].view(1, 1, -1), stm_tail[l].to(x.dtype)[None], x], dim=1)
                seq = torch.cat([seq[:, :-T], seq[:, -T:] + m.weights.new_memory_pos], dim=1)
                p_len = seq.shape[1] - n_query
                h = F_.rms_norm(seq, layer.input_norm, c.rms_norm_eps)
                q, k, v = self._qkv(layer, h, n_query, adapter)
                q = apply_rope(q, positions[p_len:], inv_freq)
                k = apply_rope(k, positions, inv_freq)
                out = F_.attention(q, k, v, F_.prefix_causal_mask(n_query, p_len, None, dev))
                y = self._finish_layer(layer, seq[:, p_len:], out, adapter)
                deltas.append(y[0, -T:])
                x = y[:, -mlen:]
        return torch.stack(deltas)

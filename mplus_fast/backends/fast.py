"""The fast backend: memory kept as cached keys/values (PERF.md levers 1, 2, 4, 5).

Memory tokens only ever contribute keys and values, and those are row-wise functions of the
stored hidden states under fixed adapters, so they are computed once:
- STM: decoder-adapter K (before RoPE) and V of every STM token, computed when the token enters
  the STM. The STM lives in *physical slots*: an update writes the T new tokens into the slots of
  the T dropped ones (O(T·d)) and only the small `order` index (logical position → slot) changes.
  Attention over a fully visible prefix does not care about row order, so keys are used in slot
  order with RoPE at each slot's logical position (R + 1 + logical index); the rotated STM keys
  are cached until the next update.
- Injection prefix: the encoder-adapter K/V of [bos | last T STM tokens] at positions 0..T,
  cached until the next update; an injection projects only its own tokens.
- LTM bank and pending buffer: pre-RoPE K/V rows (gathered per prompt, rotated on load at
  positions 1..R), retrieval keys, ages, recall frequencies, provenance, in growable row buffers
  (append in place, compact at merges). Hidden states are kept only for `save_pretrained`
  (upstream layout), on the CPU: n_l × d × dtype bytes per layer. Synthetic rows for benchmarks
  (`add_synthetic_ltm`) have none, and such a memory refuses to be materialised or saved.
Weights: each adapter merged into fused projections (QKV, gate|up), so a forward is a few GEMMs.
The memory state in the reference layout (`memory_state()`) is materialised on demand.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mplus_fast import layers as L_
from mplus_fast.backends.reference import ReadResult
from mplus_fast.kvcache import KVCache
from mplus_fast.memory import MemoryState, UpdateRecord, prune_decision, randperm_split, tile_to
from mplus_fast.profiling import nvtx_range
from mplus_fast.ops.attention import memory_attention, merge_attention_states
from mplus_fast.ops.decode import decode_attention as decode_attention_op
from mplus_fast.ops.decode import decode_attention_reference, decode_gemv
from mplus_fast.ops.gather import take_rows
from mplus_fast.ops.retrieval import retrieval_topk
from mplus_fast.ops.insertion import stm_update_
from mplus_fast.rope import engine_rope as apply_rope   # the native kernel where measured faster
from mplus_fast.rowbuffer import RowBuffer
from mplus_fast.weights import reading_adapter, writing_adapter


@dataclass
class FusedLayer:
    """One layer's projections for one adapter, merged (W + scale·B·A), fused, as (in, out)
    operands of `x @ w` (`in_out`: row-major for float32 on the CPU, where the one-token decode
    GEMVs stream them near memory bandwidth; a transposed view elsewhere)."""
    wqkv: torch.Tensor   # (d, q_out + 2 kv_out)
    wkv: torch.Tensor    # (d, 2 kv_out): the K|V columns of wqkv (a view), for memory rows
    wo: torch.Tensor     # (q_out, d)
    wgu: torch.Tensor    # (d, 2 inter)
    wd: torch.Tensor     # (inter, d)


def fuse_layer(layer, adapter, q_out: int) -> FusedLayer:
    p = layer.proj
    wqkv = torch.cat([p["q_proj"].effective_weight(adapter), p["k_proj"].effective_weight(adapter), p["v_proj"].effective_weight(adapter)])
    wgu = torch.cat([p["gate_proj"].effective_weight(adapter), p["up_proj"].effective_weight(adapter)])
    wqkv_t = in_out(wqkv)
    wo = in_out(layer.o_proj)
    layer.o_proj = wo.t()    # o_proj has no adapter: the original becomes a view of `wo` (one copy)
    # wkv: a column view of wqkv, which BLAS reads as is: no copy.
    return FusedLayer(wqkv_t, wqkv_t[:, q_out:], wo, in_out(wgu), in_out(p["down_proj"].effective_weight(adapter)))


def in_out(w: torch.Tensor) -> torch.Tensor:
    """A weight stored (out, in), as the (in, out) operand of `x @ w`. float32 on the CPU: a
    row-major copy, which the decode GEMVs stream (see decode_gemv). Otherwise a transposed view
    of the row-major (out, in) weight: what cuBLAS and the CPU's bf16/fp16 GEMMs take directly (a
    row-major (in, out) bf16 weight runs ~40x slower on the CPU)."""
    if w.device.type == "cpu" and w.dtype == torch.float32:
        return w.t().contiguous()
    return w.contiguous().t()


GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "kv": ("k_proj", "v_proj"), "gu": ("gate_proj", "up_proj"),
          "d": ("down_proj",)}


class Projections:
    """One layer's projections under one adapter: `x @ W` with the fused, merged weights, plus for
    the encoder adapter the low-rank correction scale·(B_e A_e − B_d A_d) on top of the decoder's
    merged weights. So only ONE merged copy of the large projections exists (the decoder's, used
    by every read); injections pay four rank-r GEMMs per projection instead of a second copy."""

    def __init__(self, fused: FusedLayer, layer=None, adapter=None, base_adapter=None):
        self.fused = fused
        self.corr = {}
        if layer is not None:
            for group, names in GROUPS.items():
                parts = []
                for name in names:
                    lin = layer.proj[name]
                    if adapter in lin.adapters:
                        a_e, b_e = lin.adapters[adapter]
                        a_d, b_d = lin.adapters[base_adapter]
                        parts.append((in_out(a_e), in_out(b_e), in_out(a_d), in_out(b_d), lin.scale))
                    else:
                        parts.append(None)
                self.corr[group] = parts

    def _apply(self, group: str, x: torch.Tensor, w: torch.Tensor, mm) -> torch.Tensor:
        y = mm(x, w)
        parts = self.corr.get(group)
        if not parts or all(p is None for p in parts):
            return y
        outs = []
        for part, width in zip(parts, self._widths(group, y.shape[-1])):
            if part is None:
                outs.append(y.new_zeros(*y.shape[:-1], width))
            else:
                a_e, b_e, a_d, b_d, scale = part
                outs.append(((x @ a_e) @ b_e - (x @ a_d) @ b_d) * scale)
        return y + torch.cat(outs, dim=-1)

    def _widths(self, group, total):
        f = self.fused
        q_out = f.wqkv.shape[1] - f.wkv.shape[1]
        kv = f.wkv.shape[1] // 2
        return {"qkv": (q_out, kv, kv), "kv": (kv, kv), "gu": (total // 2, total // 2), "d": (total,)}[group]

    # `mm` computes x @ w: BLAS by default, `decode_matmul` for the rows of a decode step. The
    # choice is per call site, never per row count, so memory rows (STM, bank) get bit-identical
    # K/V however many are projected at once (save → reload → continue stays bit-exact).
    def qkv(self, x, mm=torch.matmul):
        return self._apply("qkv", x, self.fused.wqkv, mm)

    def kv(self, x, mm=torch.matmul):
        return self._apply("kv", x, self.fused.wkv, mm)

    def o(self, x, mm=torch.matmul):
        return mm(x, self.fused.wo)

    def gu(self, x, mm=torch.matmul):
        return self._apply("gu", x, self.fused.wgu, mm)

    def down(self, x, mm=torch.matmul):
        return self._apply("d", x, self.fused.wd, mm)


class SyntheticBankError(RuntimeError):
    """The memory holds synthetic LTM rows (no hidden states): it cannot be materialised or saved."""


class Bank:
    """Rows of one layer's LTM bank (or pending buffer), one RowBuffer per field. `hidden` is None
    once synthetic rows were added (`drop_hidden`): they have K/V and retrieval keys but no hidden
    state, and from then on neither have the rows merged in later (the layout must stay aligned)."""

    def __init__(self, kv_shape, d, s, dtype, device, kv_device=None, hidden_device="cpu"):
        kv_device = torch.device(kv_device or device)
        pin = kv_device.type == "cpu" and torch.device(device).type != "cpu"
        self.kv = RowBuffer(kv_shape, dtype, kv_device, pin=pin)  # (2, Hkv, D): pre-RoPE K and V
        self.keys = RowBuffer((s,), dtype, device)              # retrieval keys
        self.ages = RowBuffer((), torch.int64, device)
        self.prov = RowBuffer((), torch.int64, device)
        self.rf = RowBuffer((), torch.float64, device)          # LTM only
        self.hidden = RowBuffer((d,), dtype, hidden_device)     # for save_pretrained only

    def __len__(self):
        return len(self.kv)

    def append(self, kv, keys, ages, prov, hidden, rf=None):
        self.kv.append(kv)
        self.keys.append(keys)
        self.ages.append(ages)
        self.prov.append(prov)
        if self.hidden is not None:
            self.hidden.append(hidden)
        if rf is not None:
            self.rf.append(rf)

    def drop_hidden(self) -> None:
        self.hidden = None

    def reserve(self, rows: int) -> None:
        """Capacity for `rows` rows in every field (exactly `rows` when the bank is empty), so
        filling it chunk by chunk never doubles a buffer nor copies the rows already in."""
        for b in (self.kv, self.keys, self.ages, self.prov, self.rf, self.hidden):
            if b is not None:
                b.reserve(rows)

    def buffers(self):
        fields = [self.kv, self.keys, self.ages, self.prov] + ([self.hidden] if self.hidden is not None else [])
        return fields + ([self.rf] if len(self.rf) else [])

    def keep(self, survivors):
        for b in self.buffers():
            b.keep(survivors)

    def clear(self):
        for b in self.buffers():
            b.clear()

    def nbytes_by_device(self, out: dict):
        for b in self.buffers():
            out[str(b.device)] = out.get(str(b.device), 0) + b.nbytes()


class FastBackend:
    name = "fast"

    def __init__(self, model, state: MemoryState):
        self.m = model
        c = model.config
        self.cfg = c
        self.hkv, self.hd = c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim ** -0.5
        self.q_out, self.kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        dec, enc = reading_adapter(c), writing_adapter(c)
        self.dec = [Projections(fuse_layer(l, dec, self.q_out)) for l in model.weights.layers]
        self.enc = ([Projections(d.fused, l, enc, dec) for d, l in zip(self.dec, model.weights.layers)]
                    if enc != dec else self.dec)
        self.lm_head_t = in_out(model.weights.lm_head)                           # (d, V), see FusedLayer
        if model.weights.lm_head is not model.weights.embed:
            model.weights.lm_head = self.lm_head_t.t()                           # one copy, two views
        if model.device.type != "cpu":
            model.weights.move_projections("cpu")                                # originals: for saving only
        # Where the LTM bank's K/V rows live: on the compute device, or ("host") in CPU memory
        # (pinned when computing on a GPU), fetched per prompt by the prefetch engine.
        self.placement = model.ltm_placement
        self.ltm_device = torch.device("cpu") if self.placement == "host" else model.device
        self._prefetch = None
        # bos keys/values at position 0 (RoPE at 0 is the identity), per adapter: fixed for good.
        self.bos_dec = [self._kv_rows(l, model.weights.bos[l][None], self.dec) for l in range(c.num_hidden_layers)]
        self.bos_enc = [self._kv_rows(l, model.weights.bos[l][None], self.enc) for l in range(c.num_hidden_layers)]
        self.load_state(state)

    # ------------------------------------------------------------------ projections
    def _norm(self, l, x):
        return L_.rms_norm(x, self.m.weights.layers[l].input_norm, self.cfg.rms_norm_eps)

    def _kv_rows(self, l, rows, fused) -> torch.Tensor:
        """(k, 2, Hkv, D): pre-RoPE K and V of memory rows (k, d) under an adapter."""
        kv = fused[l].kv(self._norm(l, rows))
        return kv.view(rows.shape[0], 2, self.hkv, self.hd)

    def retrieval_keys(self, l: int, rows: torch.Tensor) -> torch.Tensor:
        layer = self.m.weights.layers[l]
        return L_.selector(layer.selectors["key_proj"], self._norm(l, rows), self.cfg.hidden_act)

    def _layer_rest(self, l, proj, residual, attn, mm=torch.matmul):
        """o_proj + residual + MLP: what follows attention in a layer."""
        c = self.cfg
        x = residual + proj.o(L_.merge_heads(attn), mm)
        h = L_.rms_norm(x, self.m.weights.layers[l].post_norm, c.rms_norm_eps)
        gate, up = proj.gu(h, mm).chunk(2, dim=-1)
        return x + proj.down(L_.ACT[c.hidden_act](gate) * up, mm)

    def _split_qkv(self, qkv):
        q, k, v = qkv.split([self.q_out, self.kv_out, self.kv_out], dim=-1)
        return (L_.split_heads(q, self.cfg.num_attention_heads, self.hd), L_.split_heads(k, self.hkv, self.hd),
                L_.split_heads(v, self.hkv, self.hd))

    # ------------------------------------------------------------------ state in / out
    def load_state(self, st: MemoryState) -> None:
        c, dev, dt = self.cfg, self.m.device, self.m.dtype
        Lh, N = c.num_hidden_layers, c.stm_size
        # logical -> slot: the saved layout if there is one, else slot = logical position
        self.order = st.stm_slots.clone().to(dev) if st.stm_slots is not None else torch.arange(N, device=dev).repeat(Lh, 1)
        self.stm_h = torch.empty_like(st.stm, device=dev, dtype=dt)           # (L, N, d) by slot
        self.stm_ages = torch.empty_like(st.stm_ages, device=dev)
        self.stm_prov = torch.empty_like(st.stm_prov, device=dev)
        for l in range(Lh):
            self.stm_h[l, self.order[l]] = st.stm[l].to(dev, dt)
            self.stm_ages[l, self.order[l]] = st.stm_ages[l].to(dev)
            self.stm_prov[l, self.order[l]] = st.stm_prov[l].to(dev)
        self.stm_kv = torch.stack([self._kv_rows(l, self.stm_h[l], self.dec) for l in range(Lh)])  # (L, N, 2, Hkv, D)
        self.update_step, self.next_injection_id, self.initialized = st.update_step, st.next_injection_id, st.initialized
        self.bank, self.pend = [], []
        if c.is_mplus:
            shape = (2, self.hkv, self.hd)
            for l in range(Lh):
                b = Bank(shape, c.hidden_size, c.selector_hidden_dim, dt, dev, kv_device=self.ltm_device)
                b.append(self._kv_rows(l, st.ltm[l].to(dev, dt), self.dec), st.ltm_keys[l], st.ltm_ages[l], st.ltm_prov[l], st.ltm[l].to(dt), st.ltm_rf[l])
                p = Bank(shape, c.hidden_size, c.selector_hidden_dim, dt, dev)
                p.append(self._kv_rows(l, st.pend[l].to(dev, dt), self.dec), st.pend_keys[l], st.pend_ages[l], st.pend_prov[l], st.pend[l].to(dt))
                self.bank.append(b)
                self.pend.append(p)
        self._dirty()

    def _dirty(self):
        self._stm_rot = None          # (inv_freq, k_rot (L, Hkv, N, D), v (L, Hkv, N, D))
        self._enc_prefix = [None] * self.cfg.num_hidden_layers
        self._snapshot = None

    def memory_state(self) -> MemoryState:
        if self._snapshot is not None:
            return self._snapshot
        if self.synthetic_ltm:
            raise SyntheticBankError(
                "the LTM bank holds synthetic rows (random K/V and retrieval keys from add_synthetic_ltm, "
                "e.g. mplus_fast.testing.random_model, for benchmarks) without hidden states: the memory "
                "cannot be materialised in the reference layout (model.state) nor saved (save_pretrained)")
        c = self.cfg
        idx = self.order
        st = MemoryState(stm=torch.stack([self.stm_h[l, idx[l]] for l in range(c.num_hidden_layers)]),
                         stm_ages=torch.gather(self.stm_ages, 1, idx), stm_prov=torch.gather(self.stm_prov, 1, idx),
                         update_step=self.update_step, next_injection_id=self.next_injection_id, initialized=self.initialized,
                         stm_slots=self.order.clone())
        dev, dt = self.m.device, self.m.dtype
        for b, p in zip(self.bank, self.pend):
            st.ltm.append(b.hidden.live.to(dev, dt).clone())
            st.ltm_keys.append(b.keys.live.clone())
            st.ltm_ages.append(b.ages.live.clone())
            st.ltm_rf.append(b.rf.live.clone())
            st.ltm_prov.append(b.prov.live.clone())
            st.pend.append(p.hidden.live.to(dev, dt).clone())
            st.pend_keys.append(p.keys.live.clone())
            st.pend_ages.append(p.ages.live.clone())
            st.pend_prov.append(p.prov.live.clone())
        self._snapshot = st
        return st

    @property
    def synthetic_ltm(self) -> bool:
        return any(b.hidden is None for b in self.bank)

    def counts(self) -> dict:
        return {"ltm_sizes": [len(b) for b in self.bank], "pending": len(self.pend[0]) if self.pend else 0,
                "update_step": self.update_step, "injections": self.next_injection_id, "initialized": self.initialized,
                "synthetic_ltm": self.synthetic_ltm}

    def add_synthetic_ltm(self, n: int, generator: torch.Generator, chunk_rows: int = 16_384) -> None:
        """Append `n` random rows to every layer's LTM bank, for benchmarks at the released size
        without a checkpoint: pre-RoPE K/V and retrieval keys ~ N(0, 1), ages in [0, max LTM size),
        recall frequencies in [0, initial_rf), provenance -1. Drawn on the compute device from
        `generator`, `chunk_rows` rows at a time, and moved to where the bank keeps them, into
        buffers reserved once: the peak is the bank itself plus one chunk. No hidden states are
        made (153,600 rows x 32 layers x 4,096 bf16 would be 40 GB of host memory), so from now on
        `memory_state()` (model.state, save_pretrained) raises `SyntheticBankError`."""
        c = self.cfg
        if not c.is_mplus:
            raise ValueError("add_synthetic_ltm: this is a MemoryLLM model, which has no long-term memory")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"add_synthetic_ltm: n={n!r} must be a non-negative integer (rows per layer)")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"add_synthetic_ltm: chunk_rows={chunk_rows!r} must be a positive integer")
        for bank in self.bank:
            bank.drop_hidden()
            bank.reserve(len(bank) + n)
            for start in range(0, n, chunk_rows):
                kv, keys, ages, prov, rf = self._synthetic_rows(min(chunk_rows, n - start), generator)
                bank.append(kv, keys, ages, prov, None, rf)
        self._dirty()

    def _synthetic_rows(self, k: int, g: torch.Generator):
        c, dev = self.cfg, self.m.device
        kv = torch.randn((k, 2, self.hkv, self.hd), generator=g, device=dev, dtype=self.m.dtype)
        keys = torch.randn((k, c.selector_hidden_dim), generator=g, device=dev, dtype=self.m.dtype)
        ages = torch.randint(0, max(c.max_ltm_tokens, 1), (k,), generator=g, device=dev)
        prov = torch.full((k,), -1, dtype=torch.int64, device=dev)
        rf = torch.rand(k, generator=g, device=dev, dtype=torch.float64) * c.initial_rf_when_moving_stm_to_ltm
        return kv, keys, ages, prov, rf

    def memory_bytes_by_device(self) -> dict:
        out: dict[str, int] = {}
        for t in (self.stm_h, self.order, self.stm_ages, self.stm_prov, self.stm_kv):
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
        for b in self.bank + self.pend:
            b.nbytes_by_device(out)
        return out

    # ------------------------------------------------------------------ cached prefixes
    def _stm_rotated(self, inv_freq):
        """Per layer, the batch-shared prefix [bos | STM] as keys (STM rotated to positions
        R+1+logical, in slot order) and values: (L, Hkv, 1+N, D) each. Cached until the STM or
        the RoPE frequencies change."""
        if self._stm_rot is not None and torch.equal(self._stm_rot[0], inv_freq):
            return self._stm_rot[1], self._stm_rot[2]
        c = self.cfg
        pos = torch.empty_like(self.order)
        pos.scatter_(1, self.order, torch.arange(c.stm_size, device=self.order.device).expand_as(self.order))
        pos = pos + c.ltm_retrieved + 1                                       # (L, N) position of each slot
        k = apply_rope(self.stm_kv[:, :, 0].permute(0, 2, 1, 3), pos, inv_freq)   # (L, Hkv, N, D)
        bos = torch.stack(self.bos_dec)                                       # (L, 1, 2, Hkv, D)
        k = torch.cat([bos[:, :, 0].transpose(1, 2), k], dim=2).contiguous()
        v = torch.cat([bos[:, :, 1].transpose(1, 2), self.stm_kv[:, :, 1].permute(0, 2, 1, 3)], dim=2).contiguous()
        self._stm_rot = (inv_freq.clone(), k, v)
        return k, v

    def _injection_prefix(self, l, inv_freq):
        """Encoder-adapter K/V (post-RoPE) of [bos | last T STM tokens] at positions 0..T."""
        cached = self._enc_prefix[l]
        if cached is not None and torch.equal(cached[0], inv_freq):
            return cached[1], cached[2]
        T = self.cfg.num_tokens
        rows = self.stm_h[l, self.order[l, -T:]]
        kv = torch.cat([self.bos_enc[l], self._kv_rows(l, rows, self.enc)])  # (1+T, 2, Hkv, D)
        k = kv[:, 0].transpose(0, 1)[None]                                     # (1, Hkv, 1+T, D)
        v = kv[:, 1].transpose(0, 1)[None]
        k = apply_rope(k, torch.arange(T + 1, device=k.device), inv_freq)
        self._enc_prefix[l] = (inv_freq.clone(), k, v)
        return k, v

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, l, h, valid):
        """(B, R') indices over [bank; pending], in placement order (oldest first)."""
        c = self.cfg
        R, B = c.ltm_retrieved, h.shape[0]
        if R == 0 or len(self.bank[l]) == 0:
            return torch.empty(B, 0, dtype=torch.int64, device=h.device)
        bank, pend = self.bank[l], self.pend[l]
        n_l = len(bank)
        if n_l < R:  # SPEC §3: nothing is scored; the op returns the cyclic pattern
            queries, mask = bank.keys.live.new_zeros(B, 1, c.selector_hidden_dim), None
        else:
            layer = self.m.weights.layers[l]
            queries = L_.selector(layer.selectors["query_proj"], h, c.hidden_act).to(bank.keys.dtype)
            mask = valid
        # Fused scoring + top-R (native kernel when built): ascending indices over [bank; pending].
        idx, _ = retrieval_topk(queries, bank.keys.live, pend.keys.live if len(pend) else None, R, mask)
        ages = gather_split(bank.ages.live, pend.ages.live, idx.to(bank.ages.device), n_l)
        by_age = torch.sort(-ages.to(idx.device), dim=1, stable=True).indices
        return torch.gather(idx, 1, by_age)

    def _fetch_kv(self, l, idx):
        """Start fetching the K/V rows (B, R, 2, Hkv, D) of `idx` over [bank; pending]; returns a
        callable that waits for them. Bank rows on the compute device are gathered at once; a
        host-resident bank is read by the prefetch engine on its worker thread (and, on a GPU,
        copied on its own stream), overlapping the caller's work until the callable is called."""
        bank, pend = self.bank[l], self.pend[l]
        n_l = len(bank)
        if self.placement == "host":
            handle = self._engine(bank.kv.data, idx.numel()).request(idx.clamp(max=n_l - 1).to(self.ltm_device))
            return lambda: fill_pending(handle.wait().to(self.m.device, non_blocking=True), pend.kv.live, idx, n_l)
        rows = gather_split(bank.kv.live, pend.kv.live, idx, n_l)
        return lambda: rows

    def _engine(self, bank_rows, n_rows):
        """The prefetch engine, pointed at this layer's bank (one request in flight at a time)."""
        from mplus_fast.prefetch import PrefetchEngine
        if self._prefetch is None or self._prefetch.max_rows < n_rows:
            self._prefetch = PrefetchEngine(bank_rows, device=self.m.device, num_staging=2, max_rows=max(n_rows, 1))
        elif self._prefetch.bank is not bank_rows:
            self._prefetch.set_bank(bank_rows)
        return self._prefetch

    def _provenance(self, l, idx):
        bank, pend = self.bank[l], self.pend[l]
        return gather_split(bank.prov.live, pend.prov.live, idx.to(bank.prov.device), len(bank)).cpu()

    # ------------------------------------------------------------------ reading
    def read(self, ids, valid, *, cache_extra: int | None = None, last_only: bool = False,
             retrieve: bool = True) -> ReadResult:
        m, c = self.m, self.cfg
        B, n = ids.shape
        dev = ids.device
        R = c.ltm_retrieved
        use_memory = self.initialized
        P = c.read_prefix_len if use_memory else 0
        in_pos = P + (valid.long().cumsum(1) - 1).clamp(min=0)
        inv_freq = m.rope.inv_freq_for(int(in_pos.max()))
        ltm_pos = torch.arange(1, R + 1, device=dev)
        x = m.weights.embed[ids]
        cache = KVCache([], [], [], [], in_pos[:, -1] + 1) if cache_extra is not None else None
        all_idx, all_prov = [], []
        for l in range(c.num_hidden_layers):
            with nvtx_range(f"fast.read.layer{l}"):
                fused = self.dec[l]
                h = self._norm(l, x)
                q, k_t, v_t = self._split_qkv(fused.qkv(h))
                q, k_t = apply_rope(q, in_pos, inv_freq), apply_rope(k_t, in_pos, inv_freq)
                if use_memory:
                    idx = self._retrieve(l, h, valid) if retrieve else torch.empty(B, 0, dtype=torch.int64, device=dev)
                    fetch = self._fetch_kv(l, idx) if idx.numel() else None           # started, not awaited
                    attn, rows = self._prefill_attention(l, q, k_t, v_t, valid, fetch, ltm_pos, inv_freq)
                    all_idx.append(idx.cpu())
                    all_prov.append(self._provenance(l, idx) if idx.numel() else idx.cpu())
                else:
                    rows = None
                    empty = k_t[:1, :, :0]
                    attn, _ = memory_attention(q, empty, empty, None, None, None, k_t, v_t, valid, self.scale)
                    all_idx.append(torch.empty(B, 0, dtype=torch.int64))
                    all_prov.append(torch.empty(B, 0, dtype=torch.int64))
                x = self._layer_rest(l, fused, x, attn)
                if cache is not None:
                    cache.add_layer(*self._full_prefix(l, rows, k_t, v_t, valid, ltm_pos, inv_freq, use_memory), cache_extra)
        x = L_.rms_norm(x[:, -1:] if last_only else x, m.weights.final_norm, c.rms_norm_eps)
        return ReadResult((x @ self.lm_head_t).float(), all_idx, all_prov, cache)

    def _shared_prefix(self, l, inv_freq):
        """[bos | STM] keys (rotated) and values of layer l, shared by the whole batch: (1, Hkv, 1+N, D)."""
        k, v = self._stm_rotated(inv_freq)
        return k[l][None], v[l][None]

    def _prefill_attention(self, l, q, k_t, v_t, valid, fetch, ltm_pos, inv_freq):
        """Attention over [bos | LTM rows | STM | prompt] in two exact parts merged by log-sum-exp:
        [bos | STM | prompt] first, which needs no retrieval result and so runs while the LTM rows
        are still being fetched, then the R gathered LTM rows, rotated on load. Returns the
        attention output and the fetched rows (B, R, 2, Hkv, D) or None."""
        k_s, v_s = self._shared_prefix(l, inv_freq)
        out, lse = memory_attention(q, k_s, v_s, None, None, None, k_t, v_t, valid, self.scale)
        if fetch is None:
            return out, None
        rows = fetch()
        k_l = rows[:, :, 0].transpose(1, 2).contiguous()                      # (B, Hkv, R, D) pre-RoPE
        v_l = rows[:, :, 1].transpose(1, 2).contiguous()
        no_tail = torch.zeros_like(valid)
        out_l, lse_l = memory_attention(q, k_l, v_l, None, ltm_pos, inv_freq, k_t, v_t, no_tail, self.scale)
        return merge_attention_states(out, lse, out_l, lse_l)[0], rows

    def _full_prefix(self, l, rows, k_t, v_t, valid, ltm_pos, inv_freq, use_memory):
        """Keys (rotated) and values of [bos | LTM | STM | prompt] for the decode cache, as parts
        (the shared ones broadcast over the batch) and the key validity (B, S)."""
        B = k_t.shape[0]
        k_parts, v_parts = [], []
        if use_memory:
            k_s, v_s = self._shared_prefix(l, inv_freq)
            k_parts, v_parts = [k_s[:, :, :1].expand(B, -1, -1, -1)], [v_s[:, :, :1].expand(B, -1, -1, -1)]
            if rows is not None:
                k_parts.append(apply_rope(rows[:, :, 0].transpose(1, 2), ltm_pos, inv_freq))
                v_parts.append(rows[:, :, 1].transpose(1, 2))
            k_parts.append(k_s[:, :, 1:].expand(B, -1, -1, -1))
            v_parts.append(v_s[:, :, 1:].expand(B, -1, -1, -1))
        p_len = sum(k.shape[2] for k in k_parts)
        key_valid = torch.cat([torch.ones(B, p_len, dtype=torch.bool, device=k_t.device), valid], dim=1)
        return k_parts + [k_t], v_parts + [v_t], key_valid

    def decode_step(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One cached step for tokens (B,); returns float32 logits (B, V)."""
        pos = cache.next_pos[:, None]
        inv_freq = self.m.rope.inv_freq_for(int(pos.max())).to(tokens.device)
        slot = torch.full((1,), cache.length[0], dtype=torch.int64, device=tokens.device)
        logits = self.decode_forward(cache, tokens, pos, slot, inv_freq)
        cache.advance()
        return logits

    def decode_forward(self, cache: KVCache, tokens, pos, slot, inv_freq) -> torch.Tensor:
        """Tokens (B,) at positions pos (B, 1) through every layer, their k/v written at cache
        slot `slot` ((1,) tensor); float32 logits (B, V). Every input is a tensor already on the
        device and nothing reads back to the host, so `decoding.StaticDecoder` can capture it in
        a CUDA graph; attention runs over the whole static cache, unwritten slots masked."""
        m, c = self.m, self.cfg
        x = m.weights.embed[tokens][:, None]
        for l in range(c.num_hidden_layers):
            fused = self.dec[l]
            q, k, v = self._split_qkv(fused.qkv(self._norm(l, x), decode_matmul))
            q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
            cache.write(l, slot, k, v)
            attn = decode_attention(q, cache.k[l], cache.v[l], cache.valid[l], self.scale)
            x = self._layer_rest(l, fused, x, attn, decode_matmul)
        x = L_.rms_norm(x[:, 0], m.weights.final_norm, c.rms_norm_eps)
        return decode_matmul(x, self.lm_head_t).float()

    # ------------------------------------------------------------------ writing
    def inject(self, ids: torch.Tensor) -> torch.Tensor:
        """New memory (L, T, d) from one context (m,). Queried rows: the last T−m STM tokens
        (when m < T) then the context; the rest of [bos | last T STM] is the cached prefix."""
        m, c = self.m, self.cfg
        T, mlen = c.num_tokens, ids.shape[0]
        lead = max(T - mlen, 0)               # STM rows that are queried (only when m < T)
        p_len = 1 + T - lead                  # = 1 + min(T, m)
        inv_freq = m.rope.inv_freq_for(T + mlen)
        q_pos = torch.arange(p_len, T + mlen + 1, device=ids.device)
        x = m.weights.embed[ids][None]
        deltas = []
        for l in range(c.num_hidden_layers):
            with nvtx_range(f"fast.inject.layer{l}"):
                fused = self.enc[l]
                k_pre, v_pre = self._injection_prefix(l, inv_freq)
                rows = x
                if lead:  # a short context: the last `lead` STM tokens are queried too
                    rows = torch.cat([self.stm_h[l, self.order[l, c.stm_size - lead:]][None].to(x.dtype), x], dim=1)
                rows = torch.cat([rows[:, :-T], rows[:, -T:] + m.weights.new_memory_pos], dim=1)
                q, k_t, v_t = self._split_qkv(fused.qkv(self._norm(l, rows)))
                q, k_t = apply_rope(q, q_pos, inv_freq), apply_rope(k_t, q_pos, inv_freq)
                k = torch.cat([k_pre[:, :, :p_len], k_t], dim=2)
                v = torch.cat([v_pre[:, :, :p_len], v_t], dim=2)
                attn = attention(q, k, v, L_.prefix_causal_mask(rows.shape[1], p_len, None, ids.device))
                y = self._layer_rest(l, fused, rows, attn)
                deltas.append(y[0, -T:])
                x = y[:, -mlen:]
        return torch.stack(deltas)

    def update(self, delta: torch.Tensor) -> UpdateRecord:
        """SPEC §5 on the slotted layout. Everything new is computed before anything is
        written, so an error leaves the memory as it was."""
        c, gen = self.cfg, self.m.generator
        Lh, T, _ = delta.shape
        N = c.stm_size
        delta = delta.to(self.stm_h.dtype)
        inj = self.next_injection_id
        if not self.initialized:
            stm = torch.stack([tile_to(delta[l], N) for l in range(Lh)])
            kv = torch.stack([self._kv_rows(l, stm[l], self.dec) for l in range(Lh)])
            self.stm_h, self.stm_kv = stm, kv
            self.order = torch.arange(N, device=stm.device).repeat(Lh, 1)
            self.stm_ages.zero_()
            self.stm_prov.fill_(inj)
            self.initialized, self.next_injection_id = True, inj + 1
            self._dirty()
            return UpdateRecord(inj, torch.empty(Lh, 0, dtype=torch.int64), False, [0] * Lh)
        training = self.m.age_mode == "training"
        draws = [randperm_split(N, T, gen) for _ in range(Lh)]  # (keep, drop) per layer, as the reference
        new_kv = torch.stack([self._kv_rows(l, delta[l], self.dec) for l in range(Lh)])
        slots = torch.stack([self.order[l, d.to(self.order.device)] for l, (_, d) in enumerate(draws)])   # (L, T)
        dropped = [self.stm_h[l, slots[l]] for l in range(Lh)]
        dropped_ages = torch.gather(self.stm_ages, 1, slots) + (T if training else 0)
        dropped_keys = [self.retrieval_keys(l, dropped[l]) for l in range(Lh)] if c.is_mplus else None
        dropped_kv = [self.stm_kv[l, slots[l]] for l in range(Lh)]
        dropped_prov = torch.gather(self.stm_prov, 1, slots)
        # ---- mutate (no failure expected past this point)
        self.next_injection_id = inj + 1
        if training:
            self.stm_ages += T
        new_ages = torch.arange(T - 1, -1, -1, device=self.stm_ages.device)
        # New rows into the dropped slots (O(T·d)) and the logical order rebuilt, by the native
        # insertion op; the per-slot side arrays follow the same slots.
        stm_update_(self.stm_h, self.order, torch.stack([d for _, d in draws]).to(self.order.device), delta)
        for l in range(Lh):
            self.stm_kv[l, slots[l]] = new_kv[l]
            self.stm_ages[l, slots[l]] = new_ages
            self.stm_prov[l, slots[l]] = inj
        record = UpdateRecord(inj, torch.stack([d for _, d in draws]), False, [0] * Lh)
        self._dirty()
        if not c.is_mplus:
            return record
        for l in range(Lh):
            self.bank[l].ages.live.add_(T)
            self.pend[l].ages.live.add_(T)
            self.pend[l].append(dropped_kv[l], dropped_keys[l], dropped_ages[l], dropped_prov[l], dropped[l])
        self.update_step += T
        if self.update_step >= c.update_ltm_frequency * T:
            record.merged, record.pruned = True, self._merge()
        return record

    def _merge(self) -> list[int]:
        c = self.cfg
        pruned = []
        for b, p in zip(self.bank, self.pend):
            rf_new = torch.full((len(p),), float(c.initial_rf_when_moving_stm_to_ltm), dtype=torch.float64, device=b.rf.device)
            b.append(p.kv.live, p.keys.live, p.ages.live, p.prov.live, p.hidden.live, rf_new)
            rf, survivors = prune_decision(b.rf.live, c.ltm_retrieved, float(c.decay_frequency))
            if survivors is not None:
                pruned.append(len(b) - survivors.numel())
                b.keep(survivors)
            else:
                pruned.append(0)
            b.rf.live.copy_(rf)
            p.clear()
        self.update_step = 0
        return pruned


# ---------------------------------------------------------------------- helpers
def fill_pending(rows: torch.Tensor, pend_rows: torch.Tensor, idx: torch.Tensor, n_l: int) -> torch.Tensor:
    """`rows` holds bank rows at idx.clamp(max=n_l-1); replace those whose index points past the
    bank (idx >= n_l) by pending row idx - n_l. Indices number [bank; pending]."""
    past = idx >= n_l
    if pend_rows.shape[0] == 0 or not bool(past.any()):
        return rows
    past = past.view(*idx.shape, *([1] * (rows.dim() - idx.dim())))
    return torch.where(past, pend_rows[(idx - n_l).clamp(min=0)], rows)


def gather_split(bank_rows: torch.Tensor, pend_rows: torch.Tensor, idx: torch.Tensor, n_l: int) -> torch.Tensor:
    """Rows of [bank_rows; pend_rows] at idx without concatenating the (large) bank."""
    return fill_pending(take_rows(bank_rows, idx.clamp(max=n_l - 1)), pend_rows, idx, n_l)

DECODE_ROWS = 8   # x @ w with at most this many rows (a decode step's batch) is a GEMV


def decode_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (K, N) for a decode step: on the CPU its few rows go through the native
    decode_gemv (every weight read once, one sequential stream per thread); otherwise BLAS."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type == "cpu" and 0 < rows <= DECODE_ROWS and w.stride(1) == 1:
        return decode_gemv(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
    return x @ w


def decode_attention(q, k, v, valid, scale: float):
    """One query token over the static cache: the native CPU kernel, SDPA (the op's reference,
    one read of each kv head for its query group) elsewhere."""
    if q.device.type == "cpu":
        return decode_attention_op(q, k, v, valid, scale)
    return decode_attention_reference(q, k, v, valid, scale)


def attention(q, k, v, mask):
    """Grouped-query attention with a boolean mask (True = attend), float32 softmax inside SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

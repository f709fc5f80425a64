"""The fast backend: M+ computed over the memory store with cached keys/values (PERF.md levers
1, 2, 4, 5). This class wires the parts; each concern has its own module:

| module | what |
| --- | --- |
| `mplus_fast/store.py` | the memory (slotted STM, LTM bank, pending buffer as row buffers) and the one SPEC §5 update / merge |
| `backends/fused.py` | weight fusion: merged, fused (in, out) projections; the encoder adapter as a low-rank correction |
| `backends/prefill.py` | reading: prefill attention over [bos | LTM | STM | prompt], the decode cache |
| `backends/retrieve.py` | retrieval over the bank and the fetch of the chosen K/V rows (prefetch engine for a host bank) |
| `backends/shared_prefix.py` | the batch-shared [bos | STM] K/V, rotated: the device's one copy, read in place by prefill and decode |
| `backends/decode.py` | one decode step / the capturable `decode_forward` |
| `backends/inject.py` | injection against the cached [bos | last T STM] prefix |
| `backends/dispatch.py` | per-device kernel choice (native op or torch) |
| `backends/result.py` | `ReadResult`, shared with the reference backend |

Memory tokens only ever contribute keys and values, and those are row-wise functions of the
stored hidden states under fixed adapters, so this backend keeps them as a *derived column* of the
store (`columns`): the decoder-adapter K (before RoPE) and V of each row, computed once when the
row enters the STM, and moved with it to the pending buffer and the LTM bank by the store's
update and merge. Placement (`store_layout`): STM columns and the bank's retrieval keys, ages,
recall frequencies and provenance on the compute device; the bank's and pending buffer's K/V on
the compute device ("device") or in host memory ("host", pinned when computing on a GPU); their
hidden states always on the host (only `save_pretrained` / `model.state` need them), and with
"host" the STM's hidden states and pre-RoPE K/V too (injections copy the T rows a layer they
read; the K/V are read when an update rebuilds the rotated [bos | STM] copy on the device, see
`backends/shared_prefix.py`) and, for an untied lm_head, the token embeddings (a read copies the
few rows of its ids over). Synthetic rows
for benchmarks (`add_synthetic_ltm`) have no hidden states, and such a memory refuses to be
materialised or saved.
"""
from __future__ import annotations

import torch

from mplus_fast import layers as L_
from mplus_fast.backends import decode, inject, prefill
from mplus_fast.backends.dispatch import attention, decode_attention, decode_matmul  # noqa: F401  (re-exported)
from mplus_fast.backends.fused import FusedLayer, Projections, fuse_layer, in_out  # noqa: F401  (re-exported)
from mplus_fast.backends.result import ReadResult
from mplus_fast.backends.retrieve import fill_pending, gather_split  # noqa: F401  (re-exported)
from mplus_fast.backends.shared_prefix import SharedPrefix
from mplus_fast.memory import MemoryState, UpdateRecord
from mplus_fast.store import (ColumnSpec, MemoryStore, StoreLayout, SyntheticBankError, base_layout,  # noqa: F401
                              bytes_by_device, update)
from mplus_fast.weights import reading_adapter, writing_adapter


def store_layout(config, dtype: torch.dtype, device: torch.device, placement: str) -> StoreLayout:
    """The fast backend's columns and where each lives (see the module docstring)."""
    base = base_layout(config, dtype, device)
    host = torch.device("cpu")
    kv_shape = (2, config.num_key_value_heads, config.head_dim)
    bank_kv_device = host if placement == "host" else torch.device(device)
    pin = bank_kv_device.type == "cpu" and torch.device(device).type != "cpu"
    hidden = ColumnSpec((config.hidden_size,), dtype, host)
    bank_kv = ColumnSpec(kv_shape, dtype, bank_kv_device, pin)
    # With the bank on the host the STM hidden states go there too: only injections (T rows a
    # layer, copied over) and saving read them, and they are 2.7 GB of the released model's budget.
    stm_hidden = hidden if placement == "host" else base.stm["hidden"]
    # So do the STM's pre-RoPE K/V: the device keeps them once, rotated (`SharedPrefix`), and reads
    # this column only to rebuild that copy after an update.
    stm_kv = bank_kv if placement == "host" else ColumnSpec(kv_shape, dtype, torch.device(device))
    return StoreLayout(stm={**base.stm, "hidden": stm_hidden, "kv": stm_kv},
                       bank={**base.bank, "hidden": hidden, "kv": bank_kv},
                       pending={**base.pending, "hidden": hidden, "kv": bank_kv})


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
        tied = model.weights.lm_head is model.weights.embed
        if not tied:
            model.weights.lm_head = self.lm_head_t.t()                           # one copy, two views
        if model.device.type != "cpu":
            model.weights.move_projections("cpu")                                # originals: for saving only
        # Where the LTM bank's K/V rows live: on the compute device, or ("host") in CPU memory
        # (pinned when computing on a GPU), fetched per prompt by the prefetch engine.
        self.placement = model.ltm_placement
        if self.placement == "host" and model.device.type != "cpu" and not tied:
            # The low-memory mode keeps the token embeddings on the host too (1 GB at the released
            # size): a step looks up its few rows there (`embed`). A tied table is lm_head's too,
            # which stays on the device, so it stays there.
            model.weights.embed = model.weights.embed.to("cpu")
        self.shared = SharedPrefix()                                             # [bos | STM] K/V, rotated
        self.ltm_device = torch.device("cpu") if self.placement == "host" else model.device
        self._prefetch = None
        # bos keys/values at position 0 (RoPE at 0 is the identity), per adapter: fixed for good.
        self.bos_dec = [self.kv_rows(l, model.weights.bos[l][None], self.dec) for l in range(c.num_hidden_layers)]
        self.bos_enc = [self.kv_rows(l, model.weights.bos[l][None], self.enc) for l in range(c.num_hidden_layers)]
        self.load_state(state)

    # ------------------------------------------------------------------ compute over memory rows
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `ids` (any shape) on the ids' device; a host-resident table is read
        on the host and only the rows are copied over (the ids are read back: not capturable)."""
        table = self.m.weights.embed
        if table.device == ids.device:
            return table[ids]
        return table[ids.to(table.device)].to(ids.device)

    @property
    def host_embedding(self) -> bool:
        """Whether the embedding table lives off the compute device (see `embed`)."""
        return self.m.weights.embed.device != self.m.device

    def norm(self, l, x):
        return L_.rms_norm(x, self.m.weights.layers[l].input_norm, self.cfg.rms_norm_eps)

    def kv_rows(self, l, rows, fused) -> torch.Tensor:
        """(k, 2, Hkv, D): pre-RoPE K and V of memory rows (k, d) under an adapter."""
        kv = fused[l].kv(self.norm(l, rows))
        return kv.view(rows.shape[0], 2, self.hkv, self.hd)

    def columns(self, l: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The store's derived column of rows entering the memory: their decoder-adapter K/V."""
        return {"kv": self.kv_rows(l, hidden.to(self.m.device, self.m.dtype), self.dec)}

    def retrieval_keys(self, l: int, rows: torch.Tensor) -> torch.Tensor:
        layer = self.m.weights.layers[l]
        return L_.selector(layer.selectors["key_proj"], self.norm(l, rows.to(self.m.device)), self.cfg.hidden_act)

    def layer_rest(self, l, proj, residual, attn, mm=torch.matmul):
        """o_proj + residual + MLP: what follows attention in a layer."""
        c = self.cfg
        x = residual + proj.o(L_.merge_heads(attn), mm)
        h = L_.rms_norm(x, self.m.weights.layers[l].post_norm, c.rms_norm_eps)
        gate, up = proj.gu(h, mm).chunk(2, dim=-1)
        return x + proj.down(L_.ACT[c.hidden_act](gate) * up, mm)

    def split_qkv(self, qkv):
        q, k, v = qkv.split([self.q_out, self.kv_out, self.kv_out], dim=-1)
        return (L_.split_heads(q, self.cfg.num_attention_heads, self.hd), L_.split_heads(k, self.hkv, self.hd),
                L_.split_heads(v, self.hkv, self.hd))

    # the names these had before the split (kept for callers and merges)
    _norm, _kv_rows, _layer_rest, _split_qkv = norm, kv_rows, layer_rest, split_qkv

    # ------------------------------------------------------------------ reading, decoding, writing
    def read(self, ids, valid, *, cache_extra: int | None = None, last_only: bool = False,
             retrieve: bool = True) -> ReadResult:
        return prefill.read(self, ids, valid, cache_extra=cache_extra, last_only=last_only, retrieve=retrieve)

    def decode_step(self, cache, tokens: torch.Tensor) -> torch.Tensor:
        return decode.decode_step(self, cache, tokens)

    def decode_forward(self, cache, tokens, pos, slot, inv_freq, x=None) -> torch.Tensor:
        return decode.decode_forward(self, cache, tokens, pos, slot, inv_freq, x)

    def inject(self, ids: torch.Tensor) -> torch.Tensor:
        return inject.inject(self, ids)

    def update(self, delta: torch.Tensor) -> UpdateRecord:
        """SPEC §5 by the store's one update (this backend's K/V column moves with the rows)."""
        try:
            return update(self.store, delta, self.m.generator, self, self.m.age_mode)
        finally:
            self._dirty()

    # ------------------------------------------------------------------ the memory
    def load_state(self, st: MemoryState, derived: dict[str, torch.Tensor] | None = None) -> None:
        """Make `st` the memory; its K/V are computed from the hidden rows, or taken from `derived`
        (`derived_rows()` of this backend, for the same weights: memories switched without recomputing)."""
        layout = store_layout(self.cfg, self.m.dtype, self.m.device, self.placement)
        self.store = MemoryStore.from_state(st, self.cfg, layout, self, given=derived)
        self._dirty()

    def derived_rows(self) -> dict[str, torch.Tensor]:
        """The cached K/V of every memory row, on the host (see MemoryStore.derived_rows)."""
        return self.store.derived_rows()

    def _dirty(self):
        """The STM changed: the rotated [bos | STM] K/V are rebuilt (in place) at the next read; the
        injection prefix is dropped."""
        self.shared.invalidate()
        self._enc_prefix = [None] * self.cfg.num_hidden_layers

    def memory_state(self) -> MemoryState:
        """The memory in the reference layout: views of the store, nothing cached (see MemoryStore.view)."""
        return self.store.view()

    # Views of the store under the names tests and tools used before it existed.
    @property
    def bank(self):
        return self.store.ltm

    @property
    def pend(self):
        return self.store.pend

    @property
    def stm_h(self) -> torch.Tensor:
        return self.store.stm.columns["hidden"]

    @property
    def order(self) -> torch.Tensor:
        return self.store.stm.order

    @property
    def synthetic_ltm(self) -> bool:
        return self.store.synthetic

    def counts(self) -> dict:
        st = self.store
        return {"ltm_sizes": st.ltm_sizes(), "pending": st.pending_len(), "update_step": st.update_step,
                "injections": st.next_injection_id, "initialized": st.initialized, "synthetic_ltm": st.synthetic}

    def memory_bytes_by_device(self) -> dict:
        return bytes_by_device(self.store.nbytes())

    def memory_bytes(self) -> dict:
        """Allocated bytes per memory component and device (`MemoryStore.nbytes`)."""
        return self.store.nbytes()

    def pinned_bytes(self) -> int:
        """Pinned staging held by the prefetch engine (0 until a host bank is read on a GPU)."""
        return self._prefetch.pinned_bytes() if self._prefetch is not None else 0

    def weight_tensors(self):
        """The tensors this backend computes with (merged, fused copies and their views)."""
        for p in self.dec + ([] if self.enc is self.dec else self.enc):
            f = p.fused
            yield from (f.wqkv, f.wo, f.wgu, f.wd)
            for parts in p.corr.values():
                for part in parts:
                    if part is not None:
                        yield from part[:4]
        yield self.lm_head_t

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
        for bank in self.store.ltm:
            bank.drop_column("hidden")   # and rows merged in later have none either: the layout stays aligned
            bank.reserve(len(bank) + n)
            for start in range(0, n, chunk_rows):
                bank.append(self._synthetic_rows(min(chunk_rows, n - start), generator))
        self._dirty()

    def _synthetic_rows(self, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        c, dev = self.cfg, self.m.device
        return {"kv": torch.randn((k, 2, self.hkv, self.hd), generator=g, device=dev, dtype=self.m.dtype),
                "keys": torch.randn((k, c.selector_hidden_dim), generator=g, device=dev, dtype=self.m.dtype),
                "ages": torch.randint(0, max(c.max_ltm_tokens, 1), (k,), generator=g, device=dev),
                "prov": torch.full((k,), -1, dtype=torch.int64, device=dev),
                "rf": torch.rand(k, generator=g, device=dev, dtype=torch.float64) * c.initial_rf_when_moving_stm_to_ltm}

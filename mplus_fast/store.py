"""The memory store: the one home of the M+ / MemoryLLM memory and of its update (SPEC §2, §5).

Both backends keep their memory here and differ only in the *columns* they keep per row:

  STM      `SlottedSTM`: N physical slots per layer; `order[l, i]` is the slot of the token at
           logical position i (logical order fixes RoPE positions). Columns (L, N, *row) by slot:
           `hidden`, `ages`, `prov`, plus a backend's derived columns (the fast backend: `kv`).
  LTM      per layer a `Bank` of equal-length row buffers: `hidden`, `keys` (retrieval keys),
           `ages`, `rf` (recall frequencies), `prov`, plus derived columns.
  pending  per layer a `Bank` like the LTM's, without `rf`.

A derived column is a row-wise function of the hidden state computed once, when a row enters the
STM (`Derived.columns`): the reference keeps none and recomputes K/V from the hidden rows at each
read; the fast backend keeps its pre-RoPE K/V. A row dropped from the STM moves to the pending
buffer with every column it has (nothing is recomputed but its retrieval key), and from there to
the LTM bank at a merge. `update` and `merge` below are the only code that changes the memory.

Each column has its own device (`ColumnSpec`): that is where placement is decided, once, by the
backend's layout (see `backends/fast.py::store_layout`). `MemoryStore.view()` gives the memory in
the reference layout (`MemoryState`) as views of the live rows: nothing is copied but the STM,
gathered into logical order once after each change (`SlottedSTM.logical`), so reads between two
updates gather nothing.

A store built from a `HandedOverState` (a freshly loaded checkpoint's memory, which nobody else
holds) takes each tensor that already has its column's dtype and device as that column's buffer
instead of copying it: loading keeps the memory once, not twice (see `mplus_fast.loading`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from mplus_fast.config import MPlusConfig
from mplus_fast.memory import AGE_MODES, MemoryState, UpdateRecord, prune_decision, randperm_split, tile_to
from mplus_fast.rowbuffer import RowBuffer, holds_as_is

BASE_STM = ("hidden", "ages", "prov")
BASE_BANK = ("hidden", "keys", "ages", "prov")
# Rows of a loaded bank whose derived columns are computed at once. What a load holds above what
# the model keeps is about two float32 copies of one chunk (the RMSNorm's): 4,096 rows keep that
# at 34 MB at d 1,024 and 134 MB at d 4,096 (16,384 made it 4x that), with GEMMs still large.
CHUNK_ROWS = 4_096


class SyntheticBankError(RuntimeError):
    """The memory holds synthetic LTM rows (no hidden states): it cannot be materialised or saved."""


class HandedOverState(MemoryState):
    """A memory whose tensors are handed to the store built from it: nobody else holds them (the
    streaming loader just made them, `MPlus.from_pretrained`), so `MemoryStore.from_state` keeps
    each one that already has its column's dtype and device as that column's buffer (an STM
    column is put into slot order in place, a layer at a time) instead of copying it. The state
    must not be used after that: its tensors are the store's and change with it."""


@dataclass(frozen=True)
class ColumnSpec:
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    pin: bool = False        # page-locked host memory (a host bank read by a GPU)


@dataclass(frozen=True)
class StoreLayout:
    """Where and how each column lives: STM columns, and the LTM/pending bank columns (`rf` is
    added to the LTM only)."""
    stm: dict[str, ColumnSpec]
    bank: dict[str, ColumnSpec]
    pending: dict[str, ColumnSpec]


def base_layout(config: MPlusConfig, dtype: torch.dtype, device) -> StoreLayout:
    """Every column on one device: the reference backend's layout, and the base of the fast one's."""
    dev = torch.device(device)
    d, s = config.hidden_size, config.selector_hidden_dim
    i64 = ColumnSpec((), torch.int64, dev)
    stm = {"hidden": ColumnSpec((d,), dtype, dev), "ages": i64, "prov": i64}
    bank = {"hidden": ColumnSpec((d,), dtype, dev), "keys": ColumnSpec((s,), dtype, dev), "ages": i64, "prov": i64}
    return StoreLayout(stm, {**bank, "rf": ColumnSpec((), torch.float64, dev)}, dict(bank))


class Derived(Protocol):
    """What a backend computes from memory rows (its compute over the store)."""

    def columns(self, l: int, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Derived columns of rows (k, d) of layer l entering the memory (fast: {"kv": ...})."""

    def retrieval_keys(self, l: int, hidden: torch.Tensor) -> torch.Tensor:
        """key_proj(input_layernorm(rows)): the retrieval keys of rows leaving the STM."""


# ---------------------------------------------------------------------- row containers
class Bank:
    """One layer's LTM bank or pending buffer: named row buffers of equal length."""

    def __init__(self, specs: dict[str, ColumnSpec]):
        self.columns = {name: RowBuffer(s.row_shape, s.dtype, s.device, pin=s.pin) for name, s in specs.items()}

    def __len__(self) -> int:
        return len(self.columns["ages"])

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def column(self, name: str) -> RowBuffer:
        return self.columns[name]

    def live(self, name: str) -> torch.Tensor:
        return self.columns[name].live

    # The usual columns as attributes (None where this bank keeps no such column).
    hidden = property(lambda self: self.columns.get("hidden"))
    keys = property(lambda self: self.columns.get("keys"))
    ages = property(lambda self: self.columns.get("ages"))
    prov = property(lambda self: self.columns.get("prov"))
    rf = property(lambda self: self.columns.get("rf"))
    kv = property(lambda self: self.columns.get("kv"))

    def append(self, rows: dict[str, torch.Tensor]) -> None:
        """Append rows to every column; `rows` must hold each column (others are ignored)."""
        missing = [n for n in self.columns if n not in rows]
        if missing:
            raise ValueError(f"bank rows lack the column(s) {missing}")
        counts = {rows[n].shape[0] for n in self.columns}
        if len(counts) > 1:
            raise ValueError(f"bank rows of unequal counts {sorted(counts)} across columns")
        for name, buf in self.columns.items():
            buf.append(rows[name])

    def reserve(self, rows: int) -> None:
        """Capacity for `rows` rows in every column (exactly that many when empty)."""
        for buf in self.columns.values():
            buf.reserve(rows)

    def keep(self, survivors: torch.Tensor) -> None:
        for buf in self.columns.values():
            buf.keep(survivors)

    def clear(self) -> None:
        for buf in self.columns.values():
            buf.clear()

    def drop_column(self, name: str) -> None:
        self.columns.pop(name, None)

    def detach_(self) -> None:
        for buf in self.columns.values():
            buf.data = buf.data.detach()


class SlottedSTM:
    """The STM as physical slots: an update writes new rows into the dropped rows' slots and
    rebuilds only `order`."""

    def __init__(self, columns: dict[str, torch.Tensor], order: torch.Tensor):
        self.columns, self.order = columns, order

    @property
    def order(self) -> torch.Tensor:
        return self._order

    @order.setter
    def order(self, order: torch.Tensor) -> None:
        self._order, self._order_on = order, {}    # copies of `order` on other devices, made once each
        self.changed()

    def changed(self) -> None:
        """Forget the logical-order copies: a column or the order was just written."""
        self._logical: dict[str, torch.Tensor] = {}

    def order_on(self, device) -> torch.Tensor:
        """`order` on `device`: one copy per device until the order changes, so a column on the
        host is indexed without a device-to-host copy (and sync) per layer."""
        device = torch.device(device)
        if device == self._order.device:
            return self._order
        if device not in self._order_on:
            self._order_on[device] = self._order.to(device)
        return self._order_on[device]

    @property
    def size(self) -> int:
        return self.order.shape[1]

    def logical(self, name: str) -> torch.Tensor:
        """Column `name` (L, N, *row) in logical order: a gathered copy, made once and handed to
        every caller until the STM changes (`write`, a new `order`, `add_ages`, `detach_`), so a
        read gathers nothing when nothing changed. Read it, never write it. It is made outside
        inference mode (an ordinary tensor, usable by any later call); a column in an autograd
        graph (training) is gathered afresh each time, so each read's graph is its own."""
        col = self.columns[name]
        if col.requires_grad:
            return self.at(name, self.order)
        if name not in self._logical:
            with torch.inference_mode(False):
                self._logical[name] = self.at(name, self.order)
        return self._logical[name]

    def at(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """Rows of column `name` at physical slots (L, k): (L, k, *row)."""
        col = self.columns[name]
        layer = torch.arange(col.shape[0], device=col.device)[:, None]
        return col[layer, slots.to(col.device)]

    def rows(self, name: str, l: int, positions: slice, device) -> torch.Tensor:
        """Rows of layer l's column `name` at the logical `positions`, on `device` (a column may
        live on the host)."""
        col = self.columns[name]
        return col[l, self.order_on(col.device)[l, positions]].to(device)

    def land(self, drop: torch.Tensor) -> torch.Tensor:
        """Drop the logical positions `drop` (L, T) (distinct per layer, any order) and make room
        for T new rows at logical positions N−T … N−1; returns their slots (L, T): new row j of
        layer l lands in slot[l, j], the slot its j-th dropped row held. Rebuilds `order` only."""
        L, N = self.order.shape
        drop = drop.to(self.order.device)
        slots = self.order.gather(1, drop)
        keep = torch.ones((L, N), dtype=torch.bool, device=self.order.device)
        keep.scatter_(1, drop, False)
        self.order = torch.cat([self.order[keep].view(L, N - drop.shape[1]), slots], dim=1)
        return slots

    def write(self, slots: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Write rows (L, T, *row) of every column at `slots` (L, T)."""
        for name, col in self.columns.items():
            layer = torch.arange(col.shape[0], device=col.device)[:, None]
            col[layer, slots.to(col.device)] = rows[name].to(col.device, col.dtype)
        self.changed()

    def add_ages(self, k: int) -> None:
        """Every STM age += k (the training accounting, SPEC §7)."""
        self.columns["ages"] += k
        self.changed()

    def detach_(self) -> None:
        self.columns = {n: c.detach() for n, c in self.columns.items()}
        self.changed()


# ---------------------------------------------------------------------- the store
class MemoryStore:
    def __init__(self, config: MPlusConfig, layout: StoreLayout, stm: SlottedSTM, ltm: list[Bank], pend: list[Bank],
                 update_step: int = 0, next_injection_id: int = 0, initialized: bool = True):
        self.config, self.layout = config, layout
        self.stm, self.ltm, self.pend = stm, ltm, pend
        self.update_step, self.next_injection_id, self.initialized = update_step, next_injection_id, initialized

    @classmethod
    def from_state(cls, state: MemoryState, config: MPlusConfig, layout: StoreLayout, derived: Derived,
                   given: dict[str, torch.Tensor] | None = None) -> "MemoryStore":
        """The store of a reference-layout state, in the store's own buffers (converted to each
        column's dtype and device: copies, or with a `HandedOverState` the state's own tensors
        where they fit); derived columns are computed from the hidden rows, a bank `CHUNK_ROWS`
        rows at a time, or taken from `given` (what `derived_rows()` of a store with the same
        weights returned: nothing is recomputed then)."""
        L, N = state.stm.shape[:2]
        if given is not None:
            _check_given(given, state, layout)
        adopt = isinstance(state, HandedOverState)
        source_order = state.stm_slots if state.stm_slots is not None else torch.arange(N).repeat(L, 1)
        order = source_order.to(device=layout.stm["ages"].device, dtype=torch.int64, copy=True)
        columns = _stm_columns(state, layout, derived, given, source_order.to("cpu", torch.int64), adopt)
        store = cls(config, layout, SlottedSTM(columns, order), [], [], state.update_step, state.next_injection_id,
                    state.initialized)
        if config.is_mplus:
            for l in range(L):
                store.ltm.append(_bank_from(layout.bank, l, derived, _given_bank(given, "ltm", l, layout.bank), adopt,
                                            hidden=state.ltm[l], keys=state.ltm_keys[l], ages=state.ltm_ages[l],
                                            prov=state.ltm_prov[l], rf=state.ltm_rf[l]))
                store.pend.append(_bank_from(layout.pending, l, derived, _given_bank(given, "pending", l, layout.pending),
                                             adopt, hidden=state.pend[l], keys=state.pend_keys[l],
                                             ages=state.pend_ages[l], prov=state.pend_prov[l]))
        return store

    def derived_rows(self) -> dict[str, torch.Tensor]:
        """Every derived column of the live rows, copied to the host: `stm.NAME` (L, N, *row) in
        logical order, `ltm.L.NAME` and `pending.L.NAME` (rows, *row). `from_state(..., given=)`
        takes them back, so a memory switched out and in again under the same weights keeps its
        K/V instead of recomputing them (and keeps them bit for bit)."""
        out = {f"stm.{name}": self.stm.logical(name).to("cpu", copy=True) for name in derived_names(self.layout.stm)}
        for part, banks, specs in (("ltm", self.ltm, self.layout.bank), ("pending", self.pend, self.layout.pending)):
            for l, bank in enumerate(banks):
                for name in derived_names(specs):
                    out[f"{part}.{l}.{name}"] = bank.live(name).to("cpu", copy=True)
        return out

    # ------------------------------------------------------------------ reading
    @property
    def num_layers(self) -> int:
        return self.stm.order.shape[0]

    @property
    def synthetic(self) -> bool:
        """Synthetic rows were added (benchmarks): the bank has no hidden states."""
        return any("hidden" not in b for b in self.ltm)

    def pending_len(self) -> int:
        return len(self.pend[0]) if self.pend else 0

    def ltm_sizes(self) -> list[int]:
        return [len(b) for b in self.ltm]

    def view(self) -> MemoryState:
        """The memory in the reference layout, as views of the live rows where each column lives
        (no device copy, no second copy of the bank); only the STM is gathered into logical
        order. Valid until the next update: read it, do not keep it across one (clone it)."""
        if self.synthetic:
            raise SyntheticBankError(
                "the LTM bank holds synthetic rows (random K/V and retrieval keys from add_synthetic_ltm, "
                "e.g. mplus_fast.testing.random_model, for benchmarks) without hidden states: the memory "
                "cannot be materialised in the reference layout (model.state) nor saved (save_pretrained)")
        s = self.stm
        st = MemoryState(stm=s.logical("hidden"), stm_ages=s.logical("ages"), stm_prov=s.logical("prov"),
                         update_step=self.update_step, next_injection_id=self.next_injection_id,
                         initialized=self.initialized, stm_slots=s.order)
        for b, p in zip(self.ltm, self.pend):
            st.ltm.append(b.live("hidden"))
            st.ltm_keys.append(b.live("keys"))
            st.ltm_ages.append(b.live("ages"))
            st.ltm_rf.append(b.live("rf"))
            st.ltm_prov.append(b.live("prov"))
            st.pend.append(p.live("hidden"))
            st.pend_keys.append(p.live("keys"))
            st.pend_ages.append(p.live("ages"))
            st.pend_prov.append(p.live("prov"))
        return st

    def detach_(self) -> None:
        """Cut every row from the autograd graph that wrote it (training; values unchanged)."""
        self.stm.detach_()
        for b in self.ltm + self.pend:
            b.detach_()

    # ------------------------------------------------------------------ sizes
    def nbytes(self) -> dict[str, dict[str, int]]:
        """Allocated bytes per component and device: {"stm"|"bank_kv"|"retrieval_keys"|
        "hidden_states"|"bank_meta": {device: bytes}} (capacity, not only live rows)."""
        out: dict[str, dict[str, int]] = {}

        def add(component, t):
            per = out.setdefault(component, {})
            per[str(t.device)] = per.get(str(t.device), 0) + t.numel() * t.element_size()
        for name, col in self.stm.columns.items():
            add("stm", col)
        add("stm", self.stm.order)
        for b in self.ltm + self.pend:
            for name, buf in b.columns.items():
                add(BANK_COMPONENT.get(name, "bank_meta"), buf.data)
        return out


BANK_COMPONENT = {"kv": "bank_kv", "keys": "retrieval_keys", "hidden": "hidden_states"}


def bytes_by_device(components: dict[str, dict[str, int]]) -> dict[str, int]:
    """`MemoryStore.nbytes()` summed over components: {device: bytes}."""
    out: dict[str, int] = {}
    for per in components.values():
        for dev, n in per.items():
            out[dev] = out.get(dev, 0) + n
    return out


def _stm_columns(state: MemoryState, layout: StoreLayout, derived: Derived, given: dict[str, torch.Tensor] | None,
                 source_order: torch.Tensor, adopt: bool) -> dict[str, torch.Tensor]:
    """The STM columns (L, N, *row) by slot (`source_order[l, i]`: the slot of logical row i).
    Derived columns first, from the logical hidden rows, before an adopted hidden column is put
    into slot order in place; each layer's rows go straight to their slots (no stacked copy)."""
    L, N = state.stm.shape[:2]
    columns = {name: _empty((L, N), layout.stm[name]) for name in derived_names(layout.stm)}
    if columns:
        for l in range(L):
            rows = ({n: given[f"stm.{n}"][l] for n in columns} if given is not None
                    else derived.columns(l, state.stm[l]))
            for name, col in columns.items():
                col[l].index_copy_(0, source_order[l].to(col.device), rows[name].to(col.device, col.dtype))
    for name, logical in (("hidden", state.stm), ("ages", state.stm_ages), ("prov", state.stm_prov)):
        columns[name] = _by_slot(logical, source_order, layout.stm[name], adopt)
    return {name: columns[name] for name in layout.stm}


def _by_slot(logical: torch.Tensor, source_order: torch.Tensor, spec: ColumnSpec, adopt: bool) -> torch.Tensor:
    """`logical` (L, N, *row) as a column by slot: with `adopt`, `logical` itself when it already
    has the column's dtype and device (permuted in place a layer at a time: one layer's copy at
    most); otherwise a new column filled a layer at a time (one layer converted at a time)."""
    L, N = logical.shape[:2]
    identity = torch.equal(source_order, torch.arange(N).expand(L, N))
    if adopt and holds_as_is(logical, spec.dtype, spec.device):
        if not identity:
            for l in range(L):
                logical[l].index_copy_(0, source_order[l].to(logical.device), logical[l].clone())
        return logical
    col = _empty((L, N), spec)
    for l in range(L):
        col[l].index_copy_(0, source_order[l].to(col.device), logical[l].to(col.device, col.dtype))
    return col


def _empty(lead: tuple[int, ...], spec: ColumnSpec) -> torch.Tensor:
    pin = spec.pin and spec.device.type == "cpu" and torch.cuda.is_available()   # as RowBuffer
    return torch.empty((*lead, *spec.row_shape), dtype=spec.dtype, device=spec.device, pin_memory=pin)


def _bank_from(specs: dict[str, ColumnSpec], l: int, derived: Derived, given: dict[str, torch.Tensor] | None,
               adopt: bool, **base: torch.Tensor) -> Bank:
    """One layer's bank: each base column (`base`: hidden, keys, ages, ...) copied, or with
    `adopt` the tensor itself where it fits (`RowBuffer.from_tensor`); the derived columns
    computed from the hidden rows `CHUNK_ROWS` at a time (or copied from `given`) into buffers
    reserved once, so the peak is the bank plus one chunk's arithmetic."""
    bank = Bank(specs)
    n = base["ages"].shape[0]
    for name, t in base.items():
        s = specs[name]
        bank.columns[name] = RowBuffer.from_tensor(t, s.device, s.dtype, s.pin, adopt=adopt)
    extra = [name for name in specs if name not in base]
    for name in extra:
        bank.column(name).reserve(n)
    for start in range(0, n if extra else 0, CHUNK_ROWS):
        if given is not None:
            rows = {k: v[start:start + CHUNK_ROWS] for k, v in given.items()}
        else:
            rows = derived.columns(l, base["hidden"][start:start + CHUNK_ROWS])
        for name in extra:
            bank.column(name).append(rows[name])
    return bank


# ---------------------------------------------------------------------- derived columns handed over
def derived_names(specs: dict[str, ColumnSpec]) -> list[str]:
    """The columns of `specs` a backend derives from the hidden rows (not part of the memory itself)."""
    return [n for n in specs if n not in BASE_STM + BASE_BANK + ("rf",)]


def _given_bank(given, part: str, l: int, specs) -> dict[str, torch.Tensor] | None:
    return None if given is None else {name: given[f"{part}.{l}.{name}"] for name in derived_names(specs)}


def _check_given(given: dict[str, torch.Tensor], state: MemoryState, layout: StoreLayout) -> None:
    """`given` holds exactly the derived columns of `state`'s rows, each of the layout's row shape:
    checked before anything is built, so a bad hand-over changes nothing."""
    want = {f"stm.{n}": (tuple(state.stm.shape[:2]), layout.stm[n]) for n in derived_names(layout.stm)}
    for part, rows, specs in (("ltm", state.ltm, layout.bank), ("pending", state.pend, layout.pending)):
        for l, r in enumerate(rows):
            want.update({f"{part}.{l}.{n}": ((r.shape[0],), specs[n]) for n in derived_names(specs)})
    if set(given) != set(want):
        extra, missing = sorted(set(given) - set(want)), sorted(set(want) - set(given))
        raise ValueError(f"derived columns do not match the memory: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, (lead, spec) in want.items():
        shape = (*lead, *spec.row_shape)
        if tuple(given[name].shape) != shape or given[name].dtype != spec.dtype:
            raise ValueError(f"derived column {name!r} is {tuple(given[name].shape)} {given[name].dtype}, "
                             f"the memory needs {shape} {spec.dtype}")


# ---------------------------------------------------------------------- the update (SPEC §5)
def update(store: MemoryStore, delta: torch.Tensor, generator: torch.Generator, derived: Derived,
           age_mode: str = "inference") -> UpdateRecord:
    """Write `delta` (L, T, d) into the memory. The generator is consumed as the reference
    consumes torch's global one (one `randperm(N)` per layer, layers in order). Everything new is
    computed before anything is written, so an error leaves the memory as it was."""
    if age_mode not in AGE_MODES:
        raise ValueError(f"age_mode={age_mode!r} is not one of {AGE_MODES}")
    c, s = store.config, store.stm
    L, T, _ = delta.shape
    N = s.size
    inj = store.next_injection_id
    if not store.initialized:
        return _first_write(store, delta, derived, inj)
    training = age_mode == "training"
    draws = [randperm_split(N, T, generator) for _ in range(L)]
    drop = torch.stack([d for _, d in draws])                                  # (L, T) logical positions
    new_rows = _new_stm_rows(store, delta, derived, inj)
    dropped_slots = s.order.gather(1, drop.to(s.order.device))
    dropped = {name: s.at(name, dropped_slots) for name in s.columns}
    if training:                          # the reference's training code ages the STM before each drop
        dropped["ages"] = dropped["ages"] + T
    keys = [derived.retrieval_keys(l, dropped["hidden"][l]) for l in range(L)] if c.is_mplus else None
    # ---- mutate (no failure expected past this point)
    store.next_injection_id = inj + 1
    if training:
        s.add_ages(T)
    slots = s.land(drop)
    s.write(slots, new_rows)
    record = UpdateRecord(inj, drop, False, [0] * L, slots)
    if not c.is_mplus:
        return record
    # Everything already in the LTM or the pending buffer gets T older, then the dropped rows (with
    # their STM ages and fresh retrieval keys) join the pending buffer.
    for l in range(L):
        store.ltm[l].live("ages").add_(T)
        store.pend[l].live("ages").add_(T)
        store.pend[l].append({**{name: rows[l] for name, rows in dropped.items()}, "keys": keys[l]})
    store.update_step += T
    if store.update_step >= c.update_ltm_frequency * c.num_tokens:
        record.merged, record.pruned = True, merge(store)
    return record


def _new_stm_rows(store: MemoryStore, delta: torch.Tensor, derived: Derived, inj: int) -> dict[str, torch.Tensor]:
    """Every STM column of the T new rows (L, T, *row)."""
    L, T, _ = delta.shape
    dev = store.stm.columns["ages"].device
    hidden = delta.to(store.stm.columns["hidden"].dtype)
    rows = {"hidden": hidden,
            "ages": torch.arange(T - 1, -1, -1, dtype=torch.int64, device=dev).expand(L, T),
            "prov": torch.full((L, T), inj, dtype=torch.int64, device=dev)}
    extra = [derived.columns(l, hidden[l]) for l in range(L)]
    for name in extra[0] if extra else ():
        rows[name] = torch.stack([e[name] for e in extra])
    return rows


def _first_write(store: MemoryStore, delta: torch.Tensor, derived: Derived, inj: int) -> UpdateRecord:
    """MemoryLLM's first write into an uninitialized memory: `delta` tiled over the whole pool,
    every slot new (the landing slots are all N, in logical order)."""
    s = store.stm
    L, N = s.order.shape
    tiled = torch.stack([tile_to(delta[l], N) for l in range(L)])
    rows = _new_stm_rows(store, tiled, derived, inj)
    rows["ages"] = torch.zeros_like(rows["ages"])
    store.next_injection_id, store.initialized = inj + 1, True
    s.order = torch.arange(N, device=s.order.device).repeat(L, 1)
    s.write(s.order, rows)
    return UpdateRecord(inj, torch.empty(L, 0, dtype=torch.int64), False, [0] * L, s.order.clone())


def merge(store: MemoryStore) -> list[int]:
    """Move the pending buffer into the LTM, decay recall frequencies, prune (SPEC §5). Returns
    the rows pruned per layer."""
    c = store.config
    R, decay = c.ltm_retrieved, float(c.decay_frequency)
    pruned = []
    for bank, pend in zip(store.ltm, store.pend):
        rf_dev = bank.column("rf").device
        rf_new = torch.full((len(pend),), float(c.initial_rf_when_moving_stm_to_ltm), dtype=torch.float64, device=rf_dev)
        rows = {name: pend.live(name) for name in pend.columns}
        bank.append({**rows, "rf": rf_new})
        rf, survivors = prune_decision(bank.live("rf"), R, decay)
        pruned.append(0 if survivors is None else len(bank) - survivors.numel())
        if survivors is not None:
            bank.keep(survivors)
        bank.live("rf").copy_(rf)
        pend.clear()
    store.update_step = 0
    return pruned


class NoDerived:
    """The reference's compute over the store: no derived columns; retrieval keys by `key_fn`."""

    def __init__(self, key_fn: Callable[[int, torch.Tensor], torch.Tensor] | None):
        self.key_fn = key_fn

    def columns(self, l, hidden):
        return {}

    def retrieval_keys(self, l, hidden):
        return self.key_fn(l, hidden)

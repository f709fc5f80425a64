"""Retrieval over the store's LTM bank for the fast backend (SPEC §3): scoring + top-R by the
native `retrieval_topk`, placement order by age, and the fetch of the chosen rows' K/V (at once
from a device bank; by the prefetch engine, overlapping the caller's work, from a host bank).
Indices number [bank; pending] of a layer, as the reference's."""
from __future__ import annotations

import torch

from mplus_fast import layers as L_
from mplus_fast.ops.gather import take_rows
from mplus_fast.ops.retrieval import retrieval_topk


def retrieve(eng, l: int, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, R') indices over [bank; pending] for the queries of h (B, n, d), in placement order
    (oldest first)."""
    c = eng.cfg
    R, B = c.ltm_retrieved, h.shape[0]
    if R == 0 or not eng.store.ltm or len(eng.store.ltm[l]) == 0:
        return torch.empty(B, 0, dtype=torch.int64, device=h.device)
    bank, pend = eng.store.ltm[l], eng.store.pend[l]
    keys = bank.live("keys")
    n_l = len(bank)
    if n_l < R:  # SPEC §3: nothing is scored; the op returns the cyclic pattern
        queries, mask = keys.new_zeros(B, 1, c.selector_hidden_dim), None
    else:
        layer = eng.m.weights.layers[l]
        queries = L_.selector(layer.selectors["query_proj"], h, c.hidden_act).to(keys.dtype)
        mask = valid
    # Fused scoring + top-R (native kernel when built): ascending indices over [bank; pending].
    idx, _ = retrieval_topk(queries, keys, pend.live("keys") if len(pend) else None, R, mask)
    ages = gather_split(bank.live("ages"), pend.live("ages"), idx.to(bank.column("ages").device), n_l)
    by_age = torch.sort(-ages.to(idx.device), dim=1, stable=True).indices
    return torch.gather(idx, 1, by_age)


def fetch_kv(eng, l: int, idx: torch.Tensor):
    """Start fetching the K/V rows (B, R, 2, Hkv, D) of `idx` over [bank; pending]; returns a
    callable that waits for them. Bank rows on the compute device are gathered at once; a
    host-resident bank is read by the prefetch engine on its worker thread (and, on a GPU,
    copied on its own stream), overlapping the caller's work until the callable is called."""
    bank, pend = eng.store.ltm[l], eng.store.pend[l]
    n_l = len(bank)
    kv = bank.column("kv")
    if eng.placement == "host":
        handle = prefetch_engine(eng, kv.data, idx.numel()).request(idx.clamp(max=n_l - 1).to(kv.device))
        return lambda: fill_pending(handle.wait().to(eng.m.device, non_blocking=True), pend.live("kv"), idx, n_l)
    rows = gather_split(kv.live, pend.live("kv"), idx, n_l)
    return lambda: rows


def prefetch_engine(eng, bank_rows: torch.Tensor, n_rows: int):
    """The backend's prefetch engine, pointed at this layer's bank (one request in flight at a time)."""
    from mplus_fast.prefetch import PrefetchEngine
    if eng._prefetch is None or eng._prefetch.max_rows < n_rows:
        eng._prefetch = PrefetchEngine(bank_rows, device=eng.m.device, num_staging=2, max_rows=max(n_rows, 1))
    elif eng._prefetch.bank is not bank_rows:
        eng._prefetch.set_bank(bank_rows)
    return eng._prefetch


def provenance(eng, l: int, idx: torch.Tensor) -> torch.Tensor:
    """Injection ids (B, R') of the rows `idx`, on the CPU."""
    bank, pend = eng.store.ltm[l], eng.store.pend[l]
    prov = bank.column("prov")
    return gather_split(prov.live, pend.live("prov"), idx.to(prov.device), len(bank)).cpu()


def fill_pending(rows: torch.Tensor, pend_rows: torch.Tensor, idx: torch.Tensor, n_l: int) -> torch.Tensor:
    """`rows` holds bank rows at idx.clamp(max=n_l-1); replace those whose index points past the
    bank (idx >= n_l) by pending row idx - n_l. Indices number [bank; pending]. The pending rows
    may live elsewhere (a host bank's): only the rows gathered are moved."""
    past = idx >= n_l
    if pend_rows.shape[0] == 0 or not bool(past.any()):
        return rows
    past = past.view(*idx.shape, *([1] * (rows.dim() - idx.dim())))
    from_pending = pend_rows[(idx - n_l).clamp(min=0).to(pend_rows.device)].to(rows.device)
    return torch.where(past.to(rows.device), from_pending, rows)


def gather_split(bank_rows: torch.Tensor, pend_rows: torch.Tensor, idx: torch.Tensor, n_l: int) -> torch.Tensor:
    """Rows of [bank_rows; pend_rows] at idx without concatenating the (large) bank."""
    return fill_pending(take_rows(bank_rows, idx.clamp(max=n_l - 1)), pend_rows, idx, n_l)

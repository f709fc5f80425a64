"""Op 2, memory insertion: the O(T·d) STM update and the one-pass assembly of a layer's rows.

stm_update_(pool, order, drop, new_rows) -> ()            (mutates pool and order)
  pool      (L, N, d)  any float dtype: physical STM slots, never copied whole
  order     (L, N)     int64: order[l, i] = physical slot of the token at logical position i
                       (logical order fixes RoPE positions)
  drop      (L, T)     int64: logical positions to drop per layer (distinct, in [0, N), any order)
  new_rows  (L, T, d)  pool's dtype: the new tokens
  Per layer: new_rows[l, j] is written into the slot of the j-th dropped logical position in
  ascending logical order; order becomes [kept logical positions, old order] ++ [those T slots].
  materialize_stm(pool, order) then equals the reference's drop-and-concatenate
  cat([stm[l][kept], new_rows[l]]) (`drop_and_concat_reference`). drop is validated (shape,
  range, duplicates) before anything is written.

assemble_rows(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out) -> ()
  bos (d); bank (M, d) or None; bank_index (B, R) int64 (needed with bank); stm (N, d) physical
  slots; stm_order (N,) int64 or None (read stm in that logical order, else as is); new (B, m, d)
  or None; pos_emb (d) or None; out (B, 1 + R + N + m, d), preallocated, all the same float dtype.
  out[b] = [bos | bank[bank_index[b]] | stm[stm_order] | new[b]], then pos_emb is added to the last
  pos_emb_rows rows (0 = none; the add rounds once, like `a + b` in that dtype). Indices are
  validated before anything is written.

Kernels: the references below are the truth. Native CPU (csrc/ops/insertion.cpp, OpenMP over
rows, raw row copies) and CUDA (csrc/ops/insertion_cuda.cu + csrc/kernels/insertion.cuh: one
block per row). On CUDA the index checks cost one device->host sync per call (the price of
refusing bad indices before writing). No Triton kernel: these ops are pure data movement.
"""
from __future__ import annotations

import torch

from mplus_fast.ops._library import define_op

STM_UPDATE_SCHEMA = "stm_update_(Tensor(a!) pool, Tensor(b!) order, Tensor drop, Tensor new_rows) -> ()"
ASSEMBLE_SCHEMA = (
    "assemble_rows(Tensor bos, Tensor? bank, Tensor? bank_index, Tensor stm, Tensor? stm_order, Tensor? new,"
    " Tensor? pos_emb, int pos_emb_rows, Tensor(a!) out) -> ()"
)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


# ---------------------------------------------------------------------------------- stm_update_
def check_stm_update(pool, order, drop, new_rows) -> None:
    """Argument checks of the reference (the native kernels make the same checks in C++)."""
    if pool.dim() != 3 or pool.dtype not in FLOAT_DTYPES:
        raise ValueError(f"stm_update_: pool must be (L, N, d) float, got {_shape(pool)}")
    L, N, d = pool.shape
    if order.dtype != torch.int64 or tuple(order.shape) != (L, N):
        raise ValueError(f"stm_update_: order must be (L, N)=({L}, {N}) int64, got {_shape(order)}")
    if drop.dtype != torch.int64 or drop.dim() != 2 or drop.shape[0] != L or drop.shape[1] > N:
        raise ValueError(f"stm_update_: drop must be (L={L}, T<={N}) int64, got {_shape(drop)}")
    T = drop.shape[1]
    if new_rows.dtype != pool.dtype or tuple(new_rows.shape) != (L, T, d):
        raise ValueError(f"stm_update_: new_rows must be (L, T, d)=({L}, {T}, {d}) {pool.dtype}, got {_shape(new_rows)}")
    if drop.numel():
        if bool(((drop < 0) | (drop >= N)).any()):
            raise ValueError(f"stm_update_: drop {tuple(drop.shape)} has positions outside [0, {N})")
        srt = drop.sort(dim=1).values
        if T > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"stm_update_: drop {tuple(drop.shape)} has duplicate positions in a layer")


def stm_update_reference(pool, order, drop, new_rows) -> None:
    check_stm_update(pool, order, drop, new_rows)
    L, N, _ = pool.shape
    T = drop.shape[1]
    if T == 0:
        return
    dropped = drop.sort(dim=1).values  # (L, T) ascending logical positions
    slots = order.gather(1, dropped)  # (L, T) their physical slots
    layer = torch.arange(L, device=pool.device)[:, None].expand(L, T)
    pool[layer, slots] = new_rows  # (L, T, d) rows written in place
    keep = torch.ones((L, N), dtype=torch.bool, device=order.device)
    keep.scatter_(1, dropped, False)
    order.copy_(torch.cat([order[keep].view(L, N - T), slots], dim=1))


def drop_and_concat_reference(stm, drop, new_rows) -> torch.Tensor:
    """The reference implementation's update: copy the kept rows and append the new ones."""
    L, N, _ = stm.shape
    keep = torch.ones((L, N), dtype=torch.bool, device=stm.device)
    keep.scatter_(1, drop, False)
    return torch.stack([torch.cat([stm[l][keep[l]], new_rows[l]]) for l in range(L)])


def materialize_stm(pool, order) -> torch.Tensor:
    """(L, N, d): the STM in logical order (pool rows gathered through order)."""
    return pool.gather(1, order[:, :, None].expand(-1, -1, pool.shape[2]))


def _stm_update_fake(pool, order, drop, new_rows) -> None:
    return None


# -------------------------------------------------------------------------------- assemble_rows
def check_assemble(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out) -> None:
    if out.dim() != 3 or out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"assemble_rows: out must be (B, 1 + R + N + m, d) float, got {_shape(out)}")
    B, rows, d = out.shape
    dt = out.dtype
    if bos.dtype != dt or tuple(bos.shape) != (d,):
        raise ValueError(f"assemble_rows: bos must be (d,)=({d},) {dt}, got {_shape(bos)}")
    R = 0
    if bank is not None:
        if bank.dtype != dt or bank.dim() != 2 or bank.shape[1] != d:
            raise ValueError(f"assemble_rows: bank must be (M, d={d}) {dt}, got {_shape(bank)}")
        if bank_index is None or bank_index.dtype != torch.int64 or bank_index.dim() != 2 or bank_index.shape[0] != B:
            raise ValueError(f"assemble_rows: bank_index must be (B={B}, R) int64 with bank, got {_shape(bank_index)}")
        R = bank_index.shape[1]
        if bank_index.numel() and bool(((bank_index < 0) | (bank_index >= bank.shape[0])).any()):
            raise ValueError(f"assemble_rows: bank_index {tuple(bank_index.shape)} has rows outside [0, {bank.shape[0]})")
    if stm.dtype != dt or stm.dim() != 2 or stm.shape[1] != d:
        raise ValueError(f"assemble_rows: stm must be (N, d={d}) {dt}, got {_shape(stm)}")
    N = stm.shape[0]
    if stm_order is not None:
        if stm_order.dtype != torch.int64 or tuple(stm_order.shape) != (N,):
            raise ValueError(f"assemble_rows: stm_order must be (N,)=({N},) int64, got {_shape(stm_order)}")
        if N and bool(((stm_order < 0) | (stm_order >= N)).any()):
            raise ValueError(f"assemble_rows: stm_order {tuple(stm_order.shape)} has slots outside [0, {N})")
    m = 0
    if new is not None:
        if new.dtype != dt or new.dim() != 3 or new.shape[0] != B or new.shape[2] != d:
            raise ValueError(f"assemble_rows: new must be (B={B}, m, d={d}) {dt}, got {_shape(new)}")
        m = new.shape[1]
    if rows != 1 + R + N + m:
        raise ValueError(f"assemble_rows: out {tuple(out.shape)} must have 1 + R + N + m = {1 + R + N + m} rows")
    if pos_emb_rows < 0 or pos_emb_rows > rows or (pos_emb_rows > 0 and pos_emb is None):
        raise ValueError(f"assemble_rows: pos_emb_rows={pos_emb_rows} must be in [0, {rows}] (and needs pos_emb)")
    if pos_emb is not None and (pos_emb.dtype != dt or tuple(pos_emb.shape) != (d,)):
        raise ValueError(f"assemble_rows: pos_emb must be (d,)=({d},) {dt}, got {_shape(pos_emb)}")


def assemble_rows_reference(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out) -> None:
    check_assemble(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out)
    B, rows, d = out.shape
    parts = [bos.view(1, 1, d).expand(B, 1, d)]
    if bank is not None:
        parts.append(bank[bank_index])  # (B, R, d)
    parts.append((stm if stm_order is None else stm[stm_order]).expand(B, -1, -1))
    if new is not None:
        parts.append(new)
    full = torch.cat(parts, dim=1)  # (B, rows, d)
    if pos_emb_rows:
        full[:, rows - pos_emb_rows:] = full[:, rows - pos_emb_rows:] + pos_emb
    out.copy_(full)


def _assemble_fake(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out) -> None:
    return None


stm_update_op = define_op(STM_UPDATE_SCHEMA, stm_update_reference, _stm_update_fake)
assemble_rows_op = define_op(ASSEMBLE_SCHEMA, assemble_rows_reference, _assemble_fake)


def stm_update_(pool, order, drop, new_rows) -> None:
    torch.ops.mplus_fast.stm_update_(pool, order, drop, new_rows)


def assemble_rows(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out) -> torch.Tensor:
    """Fills and returns `out` (the op itself returns nothing)."""
    torch.ops.mplus_fast.assemble_rows(bos, bank, bank_index, stm, stm_order, new, pos_emb, pos_emb_rows, out)
    return out

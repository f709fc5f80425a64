"""Op 2, memory insertion: the O(T·d) STM update.

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

Kernels: the reference below is the truth. Native CPU (csrc/ops/insertion.cpp, OpenMP over
rows, raw row copies) and CUDA (csrc/ops/insertion_cuda.cu + csrc/kernels/insertion.cuh: one
block per row). On CUDA the index checks cost one device->host sync per call (the price of
refusing bad indices before writing). No Triton kernel: this op is pure data movement.
(`assemble_rows`, a one-pass [bos | LTM | STM | new] copy, was retired: the fast backend never
builds that concatenation; attention reads the parts where they live.)
"""
from __future__ import annotations

import torch

from mplus_fast.ops._library import define_op

STM_UPDATE_SCHEMA = "stm_update_(Tensor(a!) pool, Tensor(b!) order, Tensor drop, Tensor new_rows) -> ()"
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


stm_update_op = define_op(STM_UPDATE_SCHEMA, stm_update_reference, _stm_update_fake)


def stm_update_(pool, order, drop, new_rows) -> None:
    torch.ops.mplus_fast.stm_update_(pool, order, drop, new_rows)

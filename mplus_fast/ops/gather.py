"""Row gather from a (possibly CPU-resident, pinned) bank: ``out = bank[index]``.

Ops (namespace ``mplus_fast``):

``gather_rows(Tensor bank, Tensor index) -> Tensor``
    bank:  (M, *row) any dtype; a row is the flattened trailing dims, e.g. (d,) hidden states or
           (2, Hkv, D) pre-RoPE keys/values. Rows must be addressable by ``bank.stride(0)``
           (other layouts are made row-contiguous first).
    index: int64 (R,) or (B, R), values in [0, M), any strides.
    out:   (*index.shape, *row), bank's dtype, contiguous, on the device of the non-CPU argument
           (a CPU bank with a CUDA index gives a CUDA result: the zero-copy path).
``gather_rows_out(Tensor bank, Tensor index, Tensor(a!) out) -> ()``
    The same, written into a preallocated ``out`` (e.g. a pinned staging buffer).

Kernels: CPU = multithreaded memcpy of rows (csrc/ops/gather.cpp); CUDA = one vectorised kernel
(csrc/kernels/gather.cuh) reading either a device bank or, zero-copy, a pinned host bank through
its mapped device pointer. No Triton kernel: a byte-copy gather gains nothing from Triton.

Errors (the same from the native kernels and from the reference below): wrong index dtype ->
TypeError; wrong index dims, out shape/dtype -> ValueError; an index outside [0, M) -> IndexError
naming the value and its position. All are raised before anything is copied.
"""
from __future__ import annotations

import torch

from mplus_fast.ops._library import define_op

__all__ = ["gather_rows", "gather_rows_out", "gather_rows_reference", "gather_rows_out_reference", "check_index",
           "take_rows"]


def _out_shape(bank: torch.Tensor, index: torch.Tensor) -> list[int]:
    return [*index.shape, *bank.shape[1:]]


def _out_device(bank: torch.Tensor, index: torch.Tensor) -> torch.device:
    return index.device if index.device.type != "cpu" else bank.device


def check_index(bank: torch.Tensor, index: torch.Tensor, *, check_range: bool = True) -> None:
    """Validate ``index`` for a gather from ``bank`` (dtype, dims, and optionally range).

    The Python twin of the native checks (csrc/ops/gather.cpp); used by the reference, the fake
    kernel (``check_range=False``) and the prefetch engine. Reading the range of a CUDA index
    synchronises.
    """
    if index.dtype != torch.int64:
        raise TypeError(f"gather_rows: index must be int64, got {index.dtype} (index shape {list(index.shape)})")
    if index.dim() not in (1, 2):
        raise ValueError(f"gather_rows: index must be 1-D (R,) or 2-D (B, R), got shape {list(index.shape)}")
    if bank.dim() < 1:
        raise ValueError(f"gather_rows: bank must be (M, ...) with at least one dim, got shape {list(bank.shape)}")
    if not check_range or index.numel() == 0:
        return
    m = bank.shape[0]
    bad = (index < 0) | (index >= m)
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(index.reshape(-1)[pos])
        raise IndexError(
            f"gather_rows: index (shape {list(index.shape)}) holds {value} at flat position {pos}, "
            f"outside [0, {m}) for bank of shape {list(bank.shape)}"
        )


def _check_out(bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    if out.dtype != bank.dtype:
        raise ValueError(
            f"gather_rows_out: out has dtype {out.dtype} but bank has dtype {bank.dtype} (out shape {list(out.shape)})"
        )
    shape = _out_shape(bank, index)
    if list(out.shape) != shape:
        raise ValueError(
            f"gather_rows_out: out must have shape {shape} (index.shape + bank.shape[1:]), got {list(out.shape)}"
        )


def gather_rows_reference(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The truth: ``bank[index]`` on the output device, after the same checks as the kernels."""
    check_index(bank, index)
    rows = bank.index_select(0, index.reshape(-1).to(bank.device))  # (B*R, *row)
    return rows.reshape(_out_shape(bank, index)).to(_out_device(bank, index))


def gather_rows_out_reference(bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    check_index(bank, index, check_range=False)
    _check_out(bank, index, out)
    out.copy_(gather_rows_reference(bank, index))


def _gather_rows_fake(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    check_index(bank, index, check_range=False)
    return bank.new_empty(_out_shape(bank, index), device=_out_device(bank, index))


def _gather_rows_out_fake(bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    check_index(bank, index, check_range=False)
    _check_out(bank, index, out)


gather_rows = define_op("gather_rows(Tensor bank, Tensor index) -> Tensor", gather_rows_reference, _gather_rows_fake)
gather_rows_out = define_op(
    "gather_rows_out(Tensor bank, Tensor index, Tensor(a!) out) -> ()", gather_rows_out_reference, _gather_rows_out_fake
)


_NATIVE_CPU: bool | None = None


def take_rows(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``bank[index]`` for the engine: the native threaded CPU gather when both are on the CPU
    and the kernel is loaded (measured ~1.5-1000x faster than torch indexing on K/V rows, see
    README's ops table), torch indexing elsewhere (on a GPU: one indexing kernel)."""
    global _NATIVE_CPU
    if _NATIVE_CPU is None:
        from mplus_fast.ops._library import has_native_kernel
        _NATIVE_CPU = has_native_kernel("gather_rows", "cpu")
    if _NATIVE_CPU and bank.device.type == "cpu" and index.device.type == "cpu" and index.dtype == torch.int64 \
            and index.dim() in (1, 2) and bank.dim() >= 1:
        return gather_rows(bank, index)
    return bank[index]

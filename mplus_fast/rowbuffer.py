"""Row buffers with amortised growth: append and compact without re-concatenating.

The pending buffer and the LTM bank only ever grow by appending rows (a few hundred per
injection) and shrink by compaction at merges. Re-concatenating them each time, as the reference
does, copies the whole bank per injection; here a buffer keeps spare capacity (doubling), so an
append copies only the new rows, and a compaction gathers survivors in place.
"""
from __future__ import annotations

import torch


class RowBuffer:
    """A (capacity, *row_shape) tensor of which the first `len` rows are live."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, device, capacity: int = 0, pin: bool = False):
        self.row_shape, self.dtype, self.device, self.pin = tuple(row_shape), dtype, torch.device(device), pin
        self.len = 0
        self.data = self._alloc(max(capacity, 0))

    def _alloc(self, capacity: int) -> torch.Tensor:
        # Pinned at allocation: a 600 MB bank layer is not first allocated pageable, then copied.
        pin = pinned_here(self.pin, self.device)
        return torch.empty((capacity, *self.row_shape), dtype=self.dtype, device=self.device, pin_memory=pin)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, device=None, dtype=None, pin: bool = False, spare: int = 0,
                    adopt: bool = False) -> "RowBuffer":
        """A buffer of the rows `t`: a copy, or with `adopt` `t` itself when it already is what the
        buffer would hold (`holds_as_is`; no spare capacity asked), so a loaded bank is not held
        twice. Adopting hands `t` over: the buffer writes into it (appends past its end reallocate)."""
        dtype, device = dtype or t.dtype, torch.device(device or t.device)
        if adopt and spare == 0 and holds_as_is(t, dtype, device, pin):
            buf = cls(tuple(t.shape[1:]), dtype, device, 0, pin)
            buf.data, buf.len = t, t.shape[0]
            return buf
        buf = cls(tuple(t.shape[1:]), dtype, device, t.shape[0] + spare, pin)
        buf.append(t)
        return buf

    def __len__(self) -> int:
        return self.len

    @property
    def live(self) -> torch.Tensor:
        return self.data[: self.len]

    def reserve(self, capacity: int) -> None:
        if capacity <= self.data.shape[0]:
            return
        new = self._alloc(max(capacity, 2 * self.data.shape[0], 16))
        new[: self.len] = self.data[: self.len]
        self.data = new

    def append(self, rows: torch.Tensor) -> None:
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows of shape {tuple(rows.shape[1:])} do not fit a buffer of rows {self.row_shape}")
        k = rows.shape[0]
        self.reserve(self.len + k)
        self.data[self.len: self.len + k].copy_(rows)  # converts dtype/device in one pass, no staging copy
        self.len += k

    def keep(self, survivors: torch.Tensor) -> None:
        """Compact to the rows `survivors` (ascending indices into the live rows), in place."""
        idx = survivors.to(self.device)
        kept = self.data.index_select(0, idx)
        self.data[: kept.shape[0]] = kept
        self.len = kept.shape[0]

    def clear(self) -> None:
        self.len = 0

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def pinned_here(pin: bool, device: torch.device) -> bool:
    """Whether a buffer asked to be pinned is page-locked: host memory, and only where CUDA is."""
    return pin and device.type == "cpu" and torch.cuda.is_available()


def holds_as_is(t: torch.Tensor, dtype: torch.dtype, device, pin: bool = False) -> bool:
    """Whether `t` can serve as a buffer of `dtype` on `device` as it is: that dtype and device,
    contiguous (rows are written in place), and page-locked if the buffer must be."""
    device = torch.device(device)
    return (t.dtype == dtype and _same_device(t.device, device) and t.is_contiguous()
            and (not pinned_here(pin, device) or t.is_pinned()))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` (no index: the current device) and `cuda:0` are one device when 0 is the current one."""
    if a.type != b.type:
        return False
    index = lambda d: d.index if d.index is not None or d.type != "cuda" else torch.cuda.current_device()
    return index(a) == index(b)

"""The header of a safetensors file, read and checked without loading any tensor.

A safetensors file is an 8-byte little-endian header length H, H bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`), then
the tensor bytes. Everything a loader is about to allocate is described by the header, so the
header is checked first, against the file itself: a known dtype, a shape of non-negative
integers whose size matches its byte range, byte ranges that tile the data section exactly (no
gap, no overlap) and end where the file ends. A truncated download, a bit flip in the header or a
file claiming terabyte shapes is then one `HeaderError` naming the file and the tensor, before a
byte of tensor data is read; and `safe_open` on a file that passed cannot fail on its structure.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_HEADER_BYTES = 100_000_000   # the limit the safetensors library itself enforces
METADATA = "__metadata__"

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2), "I32": (torch.int32, 4), "U32": (torch.uint32, 4), "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
}


class HeaderError(ValueError):
    """A safetensors file whose header is unreadable or does not match the file."""


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to check it before reading it."""
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int            # byte range inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    file: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int       # offset of the data section in the file


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"the header names {key!r} twice")
        out[key] = value
    return out


def read_header(path: str | Path) -> Header:
    """The checked header of the safetensors file at `path` (nothing else is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"the file is {size} bytes long: too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"the header claims {n:,} bytes (at most {MAX_HEADER_BYTES:,}): corrupted, or not a safetensors file")
            if 8 + n > size:
                raise HeaderError(f"the header claims {n:,} bytes but the file holds {size - 8:,} after the length field (truncated)")
            text = f.read(n)
        try:
            raw = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            if isinstance(exc, HeaderError):
                raise
            raise HeaderError(f"the header is not valid JSON ({exc}): corrupted, or not a safetensors file") from None
        if not isinstance(raw, dict):
            raise HeaderError("the header is not a JSON object: corrupted, or not a safetensors file")
        metadata = _metadata(raw.pop(METADATA, {}))
        tensors = {name: _tensor_info(path, name, spec) for name, spec in raw.items()}
        _check_tiling(tensors, size - 8 - n)
        return Header(path, tensors, metadata, 8 + n)
    except HeaderError as exc:
        raise HeaderError(f"{path}: {exc}") from None


def _metadata(meta) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(f"{METADATA} must map strings to strings")
    return meta


def _tensor_info(path: Path, name: str, spec) -> TensorInfo:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise HeaderError(f"tensor {name!r}: the header entry must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPES:
        raise HeaderError(f"tensor {name!r}: dtype {dtype!r} is not supported (one of {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise HeaderError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
        raise HeaderError(f"tensor {name!r}: data_offsets {offsets!r} is not a byte range [begin, end]")
    torch_dtype, itemsize = DTYPES[dtype]
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != offsets[1] - offsets[0]:
        raise HeaderError(f"tensor {name!r}: shape {tuple(shape)} of {dtype} needs {numel * itemsize:,} bytes "
                          f"but its data_offsets span {offsets[1] - offsets[0]:,}")
    return TensorInfo(path, torch_dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """The byte ranges cover the data section exactly, in order (what safetensors requires)."""
    at = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != at:
            what = "overlaps the tensor before it" if info.begin < at else f"leaves a gap at byte {at:,}"
            raise HeaderError(f"tensor {name!r}: data_offsets {[info.begin, info.end]} {what}")
        at = info.end
    if at > data_bytes:
        raise HeaderError(f"the header describes {at:,} bytes of tensor data but the file holds {data_bytes:,} (truncated)")
    if at < data_bytes:
        raise HeaderError(f"the file holds {data_bytes - at:,} bytes after the last tensor (corrupted or appended to)")

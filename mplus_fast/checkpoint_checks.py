"""What an M+ / MemoryLLM checkpoint must hold, checked against its config in two passes.

1. `check_layout(config, headers)`: from the safetensors headers alone, before any tensor is
   read: every tensor the config requires is there, nothing unexpected is, and each has the shape
   and kind of dtype its role allows. A file claiming absurd shapes is refused here, unallocated.
2. `check_tensor(name, tensor, header)` as each tensor is read, and `check_state(config, tensors)`
   once all are: floats are finite (NaN/Inf in a weight or in the memory is refused, the tensor
   named), ages are non-negative, the STM slot map is a permutation, provenance ids are valid,
   the generator state is one torch accepts, and a tensor saved by mplus_fast matches the CRC-32
   it was saved with (a flipped bit in the data, which no header check can see).

Every failure is one `CheckpointError` naming the tensor (and the file where it matters), and the
message points at the cause: a shape error also names the config fields whose defaults were used.
"""
from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import torch

from mplus_fast.config import MPlusConfig
from mplus_fast.safetensors_header import Header, TensorInfo
from mplus_fast.weights import expected_weight_shapes

OURS = "mplus_fast."
CRC_KEY = "mplus_fast.crc32"     # safetensors metadata: JSON {tensor name: CRC-32 of its bytes}

# Kinds of tensor, by the dtypes they may be stored in.
FLOAT, NUMBER, INDEX, FLAG, BYTES = "float", "number", "index", "flag", "bytes"
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)
KIND_DTYPES = {
    FLOAT: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    NUMBER: (torch.float16, torch.bfloat16, torch.float32, torch.float64) + _INTS,
    INDEX: _INTS,
    FLAG: (torch.bool,) + _INTS,
    BYTES: (torch.uint8,),
}
KIND_WORDS = {FLOAT: "a floating-point dtype", NUMBER: "a numeric dtype", INDEX: "an integer dtype",
              FLAG: "a boolean or integer dtype", BYTES: "uint8"}
ANY = -1   # a dimension of any length


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (the message names the tensor or file)."""


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    kind: str
    required: bool


def expected_layout(config: MPlusConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, Spec]:
    """Every tensor name a checkpoint of `config` may hold, with its shape, kind and whether it is
    required. The LTM and pending-buffer lengths are the checkpoint's own (read from `shapes`)."""
    c = config
    L, d, s, N = c.num_hidden_layers, c.hidden_size, c.selector_hidden_dim, c.stm_size
    out = {name: Spec(shape, FLOAT, True) for name, shape in expected_weight_shapes(c).items()}
    out["memory"] = Spec((L, N, d), FLOAT, True)
    out["update_step"] = Spec((), INDEX, False)
    out["initialized"] = Spec((), FLAG, False)
    out[f"{OURS}stm_provenance"] = Spec((L, N), INDEX, False)
    out[f"{OURS}stm_slots"] = Spec((L, N), INDEX, False)
    out[f"{OURS}next_injection_id"] = Spec((), INDEX, False)
    out[f"{OURS}generator_state"] = Spec((ANY,), BYTES, False)
    out[f"{OURS}rope_inv_freq"] = Spec((c.head_dim // 2,), FLOAT, False)
    out[f"{OURS}rope_cached_len"] = Spec((), INDEX, False)
    for i in range(L):
        out[f"memory_ages.{i}"] = Spec((N,), NUMBER, False)
        if not c.is_mplus:
            continue
        n = _rows(shapes, f"ltm.{i}")
        p = _rows(shapes, f"cached_dropped_memories.{i}", default=0)
        out.update({f"ltm.{i}": Spec((n, d), FLOAT, True), f"ltm_keys.{i}": Spec((n, s), FLOAT, True),
                    f"ltm_ages.{i}": Spec((n,), NUMBER, True), f"ltm_recall_frequencies.{i}": Spec((n,), NUMBER, True),
                    f"{OURS}ltm_provenance.{i}": Spec((n,), INDEX, False),
                    f"cached_dropped_memories.{i}": Spec((p, d), FLOAT, False),
                    f"cached_dropped_keys.{i}": Spec((p, s), FLOAT, False),
                    f"cached_dropped_memory_ages.{i}": Spec((p,), NUMBER, False),
                    f"{OURS}pending_provenance.{i}": Spec((p,), INDEX, False)})
    return out


def _rows(shapes: dict[str, tuple[int, ...]], name: str, default: int = ANY) -> int:
    shape = shapes.get(name)
    return shape[0] if shape else default


def _defaults_hint(config: MPlusConfig) -> str:
    fields = config.defaulted_shape_fields()
    return f" (config.json does not set {', '.join(fields)}: the default was used)" if fields else ""


def check_layout(config: MPlusConfig, infos: dict[str, TensorInfo] | dict[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes of the tensors (header entries or tensors) against the config."""
    shapes = {k: tuple(v.shape) for k, v in infos.items()}
    layout = expected_layout(config, shapes)
    if config.is_mplus:
        missing_ltm = [f"ltm.{i}" for i in range(config.num_hidden_layers) if f"ltm.{i}" not in shapes]
        if missing_ltm:
            raise CheckpointError(f"checkpoint is missing tensor {missing_ltm[0]!r} (M+ long-term memory of layer "
                                  f"{missing_ltm[0].split('.')[1]}){_defaults_hint(config)}")
    missing = [k for k, spec in layout.items() if spec.required and k not in shapes]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:5]}{more} required by its config.json"
                              f"{_defaults_hint(config)}")
    for name, info in infos.items():
        spec = layout.get(name)
        if spec is None:
            raise CheckpointError(f"checkpoint has unexpected tensor {name!r} {shapes[name]} for a "
                                  f"{config.architecture} config with {config.num_hidden_layers} layers"
                                  f"{_defaults_hint(config)}")
        want = spec.shape
        if len(want) != len(shapes[name]) or any(w != ANY and w != g for w, g in zip(want, shapes[name])):
            shown = tuple("any" if w == ANY else w for w in want)
            raise CheckpointError(f"tensor {name!r} has shape {shapes[name]}, expected {shown} from config.json"
                                  f"{_defaults_hint(config)}")
        if info.dtype not in KIND_DTYPES[spec.kind]:
            raise CheckpointError(f"tensor {name!r} has dtype {str(info.dtype).replace('torch.', '')}, "
                                  f"expected {KIND_WORDS[spec.kind]}")
    if config.is_mplus:
        pend = {shapes.get(f"cached_dropped_memories.{i}", (0,))[0] for i in range(config.num_hidden_layers)}
        if len(pend) > 1:
            raise CheckpointError(f"cached_dropped_memories.* have different lengths across layers: {sorted(pend)}")


# ---------------------------------------------------------------------- values
def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (C order), as safetensors stores them."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else 0


def checksums(tensors: dict[str, torch.Tensor]) -> str:
    """The metadata value saved with a file of `tensors` (CRC_KEY)."""
    with ThreadPoolExecutor(max_workers=_workers()) as pool:   # zlib releases the GIL
        crcs = dict(zip(tensors, pool.map(crc32, tensors.values())))
    return json.dumps(crcs, separators=(",", ":"), sort_keys=True)


def saved_checksums(header: Header) -> dict[str, int]:
    """The CRC-32s a file was saved with ({} for files not written by mplus_fast)."""
    text = header.metadata.get(CRC_KEY)
    if text is None:
        return {}
    try:
        crcs = json.loads(text)
        if not isinstance(crcs, dict) or not all(isinstance(v, int) for v in crcs.values()):
            raise ValueError("not an object of integers")
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{header.file}: the checksums in the header are unreadable ({exc}): the file is corrupted") from None
    return crcs


def _workers() -> int:
    return max(1, min(8, torch.get_num_threads()))


def check_tensor(name: str, tensor: torch.Tensor, file=None, crc: int | None = None) -> None:
    """One tensor as read: its saved CRC-32 (when given) and finite values (floating dtypes)."""
    where = f" in {file}" if file is not None else ""
    if crc is not None and crc32(tensor) != crc:
        raise CheckpointError(f"tensor {name!r}{where} does not match the checksum it was saved with: "
                              "the file is corrupted (a bad copy, disk or download); restore it from a good copy")
    if tensor.dtype.is_floating_point and tensor.numel():
        lo, hi = torch.aminmax(tensor)          # NaN and ±Inf propagate into the extremes
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            value = tensor[tuple(bad)].item()
            raise CheckpointError(f"tensor {name!r}{where} holds {value} at index {tuple(bad)}: "
                                  "weights and memory must be finite")


def check_tensors(tensors: dict[str, torch.Tensor], files: dict[str, object] | None = None,
                  crcs: dict[str, int] | None = None) -> None:
    """`check_tensor` over many tensors, on a few threads (CRC-32 and the reductions release the GIL)."""
    files, crcs = files or {}, crcs or {}
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        futures = [pool.submit(check_tensor, k, t, files.get(k), crcs.get(k)) for k, t in tensors.items()]
        for f in futures:
            f.result()


def check_state(config: MPlusConfig, t: dict[str, torch.Tensor]) -> None:
    """Relations between the memory-state tensors that their shapes cannot show."""
    L = config.num_hidden_layers
    next_id = _scalar(t, f"{OURS}next_injection_id", 0)
    for name in ("update_step", f"{OURS}next_injection_id"):
        if name in t and int(t[name]) < 0:
            raise CheckpointError(f"tensor {name!r} is {int(t[name])}: it must be non-negative")
    if "initialized" in t and int(t["initialized"]) not in (0, 1):
        raise CheckpointError(f"tensor 'initialized' is {int(t['initialized'])}: it must be 0 or 1")
    if f"{OURS}rope_cached_len" in t and int(t[f"{OURS}rope_cached_len"]) < 1:
        raise CheckpointError(f"tensor '{OURS}rope_cached_len' is {int(t[f'{OURS}rope_cached_len'])}: it must be positive")
    for name in _present(t, [f"memory_ages.{i}" for i in range(L)] + [f"ltm_ages.{i}" for i in range(L)]
                         + [f"cached_dropped_memory_ages.{i}" for i in range(L)]):
        if t[name].numel() and float(t[name].min()) < 0:
            raise CheckpointError(f"tensor {name!r} holds a negative age ({float(t[name].min()):g})")
    provenance = [f"{OURS}stm_provenance"] + [f"{OURS}{k}_provenance.{i}" for k in ("ltm", "pending") for i in range(L)]
    for name in _present(t, provenance):
        p = t[name]
        if p.numel() and (int(p.min()) < -1 or int(p.max()) >= next_id):
            raise CheckpointError(f"tensor {name!r} holds injection ids in [{int(p.min())}, {int(p.max())}]; "
                                  f"valid ids are -1 (from a checkpoint) and 0..{next_id - 1}")
    slots = t.get(f"{OURS}stm_slots")
    if slots is not None and slots.numel():
        want = torch.arange(config.stm_size, dtype=torch.int64)
        for l in range(L):
            if not torch.equal(torch.sort(slots[l].to(torch.int64)).values, want):
                raise CheckpointError(f"tensor '{OURS}stm_slots' row {l} is not a permutation of 0..{config.stm_size - 1}")
    state = t.get(f"{OURS}generator_state")
    if state is not None:
        try:
            torch.Generator().set_state(state.to(torch.uint8))
        except RuntimeError as exc:
            raise CheckpointError(f"tensor '{OURS}generator_state' is not a state of torch's CPU generator ({exc})") from None


def _present(t: dict, names: Iterable[str]) -> list[str]:
    return [n for n in names if n in t]


def _scalar(t: dict, name: str, default: int) -> int:
    return int(t[name]) if name in t else default

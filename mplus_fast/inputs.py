"""Checks of what callers hand to `MPlus`: devices, dtypes, token ids, masks, flags, positions.

Each check runs before the model computes or changes anything, so a refused call leaves the
memory as it was, and each error names the argument and says what would be accepted. Mistakes
that are easy to make with M+ in particular get their own explanation: a leading tokenizer BOS
(M+ prepends its own learned BOS), positions past the trained range, and contexts shorter than the
16 tokens the authors ask for (a warning: such an injection is valid, just mostly old memory).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from mplus_fast.chunking import MIN_CONTEXT_TOKENS

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda")


class ShortInjectionWarning(UserWarning):
    """An injection shorter than MIN_CONTEXT_TOKENS tokens (valid, but mostly old memory re-encoded)."""


@contextlib.contextmanager
def short_injections_expected():
    """For the package's own callers whose injections are short by design (the training and
    evaluation passages, cut at word ends to the model's T tokens): the warning is not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShortInjectionWarning)
        yield


class IgnoredOptionWarning(UserWarning):
    """An option that has no effect in this call (e.g. temperature without do_sample)."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """warnings.warn, attributed to the first frame outside mplus_fast and torch (the user's line,
    whatever decorators and helpers lie between)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# ---------------------------------------------------------------------- devices and dtypes
def resolve_device(device) -> torch.device:
    """A device the model can live on, checked against this machine: "cpu", "cuda", "cuda:N" (or a
    torch.device, or an index N for cuda:N). `"cuda"` → `cuda:<current device>`: tensors on a GPU
    always report an index, and inputs are checked against the model's device by equality."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"device={device!r} must be a string such as 'cpu' or 'cuda:0', or a torch.device")
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a device name (expected 'cpu', 'cuda' or 'cuda:N')") from None
    if d.type not in DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not supported: mplus_fast runs on {' and '.join(map(repr, DEVICE_TYPES))}")
    if d.type == "cpu":
        return torch.device("cpu")   # "cpu:0" too: CPU tensors report plain "cpu"
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device={device!r}: CUDA is not available here ({why}); use device='cpu'")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if d.index is None else d.index
    if not 0 <= index < count:
        raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s) (cuda:0 … cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The compute dtype: float32, bfloat16 or float16 (float64 too, for the reference backend's
    gradient checks), as a torch.dtype or its name ("bfloat16", "torch.bfloat16"); None → float32
    on the CPU, bfloat16 on a GPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    allowed = {**DTYPE_NAMES, "float64": torch.float64}
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in allowed:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(map(repr, allowed))}")
        return allowed[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r} must be a torch.dtype or one of {', '.join(map(repr, allowed))}")
    if dtype not in allowed.values():
        raise ValueError(f"dtype={dtype} is not supported (float32, bfloat16, float16; float64 with the reference backend)")
    return dtype


# ---------------------------------------------------------------------- flags and options
def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")
    return value


def check_count(value, name: str, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < int(positive):
        raise ValueError(f"{name}={value!r} must be a {'positive' if positive else 'non-negative'} integer")
    return value


def check_token_id(value, name: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name}={value!r} must be a token id in [0, {vocab_size})")
    return value


# ---------------------------------------------------------------------- token ids and masks
def check_ids(ids, name: str, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(n,) or (B, n) integer token ids on `device`, inside the vocabulary → (B, n) int64."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 1-D (n,) or 2-D (batch, n), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): at least one token is needed")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the model is on {device}; move it with .to({str(device)!r})")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids.long()


def check_mask(mask, ids: torch.Tensor, device: torch.device, name: str = "attention_mask") -> torch.Tensor:
    """None (all real) or a left-padded 0/1 mask of the ids' shape → bool (B, n)."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must hold 0 and 1, got dtype {mask.dtype}")
    if mask.dim() == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the ids have shape {tuple(ids.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the model is on {device}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    valid = mask.bool()
    if not bool(valid.any(1).all()):
        raise ValueError(f"{name}: row {int((~valid.any(1)).nonzero()[0])} has no real token")
    # Left padding: once a row has a real token, every later token is real.
    if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        raise ValueError(f"{name} must be left-padded (zeros only before the first real token)")
    return valid


def check_no_leading_bos(ids: torch.Tensor, valid: torch.Tensor, bos_ids: set[int], name: str) -> None:
    """The first real token of each row is not the tokenizer's BOS: M+ prepends its own."""
    if not bos_ids:
        return
    first = ids.gather(1, valid.to(torch.int8).argmax(1, keepdim=True))[:, 0]   # left padding: first True
    hit = torch.isin(first, torch.tensor(sorted(bos_ids), device=ids.device))
    if bool(hit.any()):
        row = int(hit.nonzero()[0])
        raise ValueError(
            f"{name} row {row} starts with token {int(first[row])}, the tokenizer's BOS (bos_token_id): M+ "
            "prepends its own learned BOS embedding in every layer, so inputs must not carry one. Encode "
            "without special tokens (tokenizer.encode(text, add_special_tokens=False)) or drop the first token.")


def check_positions(limit: int | None, prefix: int, n: int, name: str, new_tokens: int = 0) -> None:
    """The positions a call uses — the prefix, n input tokens, then the generated tokens fed back
    (all but the last) — stay under the config's limit (None: no limit)."""
    fed_back = max(new_tokens - 1, 0)
    last = prefix + n + fed_back - 1
    if limit is None or last < limit:
        return
    more = f" and max_new_tokens={new_tokens}" if new_tokens else ""
    raise ValueError(f"{name}: {n} tokens after the memory prefix of {prefix} positions{more} reach position "
                     f"{last}, past the {limit} positions of the model's RoPE (max_position_embeddings in "
                     f"config.json); at most {limit - prefix - fed_back} tokens fit{more and ' with that max_new_tokens'}")


def warn_short_injection(lengths: list[int], num_tokens: int) -> None:
    short = [m for m in lengths if m < MIN_CONTEXT_TOKENS]
    if short:
        warn_at_caller(
            f"context_ids: an injection of {min(short)} token(s), under the {MIN_CONTEXT_TOKENS} the authors ask for: "
            f"every injection writes T={num_tokens} memory tokens computed from the last T positions, so a short "
            "context is mostly old memory re-encoded. Join short pieces (mplus_fast.chunking.chunk_ids does).",
            ShortInjectionWarning)

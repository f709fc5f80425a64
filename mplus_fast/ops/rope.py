"""Op 5: rotary position embedding (RoPE) at arbitrary per-row positions.

`torch.ops.mplus_fast.rope_apply(x, positions, inv_freq, attention_scaling=1.0) -> Tensor`

    x           (B, H, S, D) float32 / bfloat16 / float16, any strides; D even.
    positions   (S,) or (B, S) int64: the position of each row (shared by all heads).
    inv_freq    (D/2,) float32: inverse frequencies. The RoPE variants of SPEC §1 (default, linear,
                dynamic, llama3) differ only in inv_freq / attention_scaling, which the engine
                computes; in bf16 parity mode it passes bf16-rounded inv_freq (as float32).
    returns     (B, H, S, D) contiguous, dtype of x.

Semantics are exactly Hugging Face Llama's (the truth): the angles and cos/sin are computed in
float32, scaled by attention_scaling, *rounded to x.dtype*, and the rotation
``x * cos + rotate_half(x) * sin`` is evaluated in x.dtype (each product and the sum rounded).
The native kernels reproduce each rounding step, so they differ from the reference only where
their float32 cos/sin differ from torch's by an ulp.
"""
from __future__ import annotations

import torch

from mplus_fast.ops._library import define_op
from mplus_fast.rope import apply_rope

__all__ = ["rope_apply", "rope_apply_reference", "check_rope_args"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_rope_args(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Argument checks of the reference and fake kernels (the C++ kernels mirror them in rope.cpp)."""
    if x.dim() != 4 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rope_apply: x must be (B, H, S, D) float32/bfloat16/float16, got {tuple(x.shape)} {x.dtype}")
    B, _, S, D = x.shape
    if D % 2:
        raise ValueError(f"rope_apply: x head dim D must be even, got x {tuple(x.shape)}")
    if positions.dtype != torch.int64 or positions.shape not in ((S,), (B, S)):
        raise ValueError(
            f"rope_apply: positions must be int64 of shape ({S},) or ({B}, {S}), got {tuple(positions.shape)} {positions.dtype}"
        )
    if inv_freq.dtype != torch.float32 or tuple(inv_freq.shape) != (D // 2,):
        raise ValueError(
            f"rope_apply: inv_freq must be float32 of shape ({D // 2},), got {tuple(inv_freq.shape)} {inv_freq.dtype}"
        )
    if positions.device != x.device or inv_freq.device != x.device:
        raise ValueError(
            f"rope_apply: x ({x.device}), positions ({positions.device}) and inv_freq ({inv_freq.device}) must share a device"
        )


def rope_apply_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                         attention_scaling: float = 1.0) -> torch.Tensor:
    """The engine's RoPE (mplus_fast.rope.apply_rope: Hugging Face Llama semantics), checked."""
    check_rope_args(x, positions, inv_freq)
    return apply_rope(x, positions, inv_freq, attention_scaling).contiguous()


def _rope_fake(x, positions, inv_freq, attention_scaling=1.0):
    check_rope_args(x, positions, inv_freq)
    return x.new_empty(x.shape)


rope_apply = define_op(
    "rope_apply(Tensor x, Tensor positions, Tensor inv_freq, float attention_scaling=1.0) -> Tensor",
    rope_apply_reference,
    _rope_fake,
)

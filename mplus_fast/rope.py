"""Rotary position embeddings: the inverse-frequency variants of SPEC §1 and their application.

The variants only change `inv_freq` (and, for none of the supported ones, the attention scaling):
default, linear, dynamic (NTK, recomputed when a call reaches past max_position_embeddings),
llama3 (Llama-3.1's banded rescaling). Application follows Hugging Face Llama exactly: cos/sin are
computed in float32 from position × inv_freq, cast to the activation dtype, then
x·cos + rotate_half(x)·sin in that dtype.

bf16 parity: the reference casts the whole model to bf16, buffers included, so its *initial*
inv_freq is rounded to bf16 (`round_inv_freq_to=torch.bfloat16`). Dynamic-NTK recomputation makes a
fresh float32 buffer, and a reset restores the float32 original (an attribute the cast never
touched): both reproduced here.
"""
from __future__ import annotations

import math

import torch

from mplus_fast.config import MPlusConfig


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (base ** exponents)


def llama3_inv_freq(base: float, dim: int, scaling: dict) -> torch.Tensor:
    inv_freq = default_inv_freq(base, dim)
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def dynamic_inv_freq(base: float, dim: int, factor: float, max_pos: int, seq_len: int) -> torch.Tensor:
    seq_len = max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(base, dim)


class RotaryEmbedding:
    """Per-model RoPE state. `inv_freq_for(max_position)` is called once per forward call.
    The frequencies are computed on the CPU (the same values everywhere) and kept on `device`,
    the model's, where every kernel that takes them (memory_attention, rope_apply) wants them."""

    def __init__(self, config: MPlusConfig, round_inv_freq_to: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.type = config.rope_type
        self.dim = config.head_dim
        self.base = float(config.rope_theta)
        self.scaling = dict(config.rope_scaling or {})
        self.max_pos = int(config.max_position_embeddings)
        if self.type == "default" or self.type == "dynamic":
            original = default_inv_freq(self.base, self.dim)
        elif self.type == "linear":
            original = default_inv_freq(self.base, self.dim) / self.scaling["factor"]
        elif self.type == "llama3":
            original = llama3_inv_freq(self.base, self.dim, self.scaling)
        else:  # validated by MPlusConfig
            raise ValueError(f"unsupported rope type {self.type!r}")
        self.original = original.to(self.device)
        rounded = original if round_inv_freq_to is None else original.to(round_inv_freq_to).float()
        self.inv_freq = rounded.to(self.device)
        self.cached_len = self.max_pos
        self.attention_scaling = 1.0

    def inv_freq_for(self, max_position: int) -> torch.Tensor:
        """The float32 inverse frequencies used by a call whose largest position is `max_position`."""
        if self.type == "dynamic":
            seq_len = max_position + 1
            if seq_len > self.cached_len:  # growth: recompute for the longer sequence
                self.inv_freq = dynamic_inv_freq(self.base, self.dim, self.scaling["factor"], self.max_pos,
                                                 seq_len).to(self.device)
                self.cached_len = seq_len
            if seq_len < self.max_pos and self.cached_len > self.max_pos:  # back in range: reset
                self.inv_freq = self.original
                self.cached_len = self.max_pos
        return self.inv_freq

    def fixed_over(self, first: int, last: int) -> bool:
        """Whether calls `inv_freq_for(p)` for p = first, …, last (in order) all return the current
        frequencies and leave the state as it is (always, except dynamic growth or reset)."""
        if self.type != "dynamic" or last < first:
            return True
        grows = last + 1 > self.cached_len
        resets = first + 1 < self.max_pos and self.cached_len > self.max_pos
        return not (grows or resets)

    def state(self) -> dict:
        """What a checkpoint stores (on the CPU)."""
        return {"inv_freq": self.inv_freq.to("cpu", copy=True), "cached_len": self.cached_len}

    def load_state(self, state: dict) -> None:
        self.inv_freq = state["inv_freq"].to(self.device, torch.float32, copy=True)
        self.cached_len = int(state["cached_len"])


_NATIVE_CPU: bool | None = None


def _native_cpu_kernel() -> bool:
    """Whether mplus_fast._C's CPU rope_apply is loaded (looked up once; imported late, as the
    op module imports this one)."""
    global _NATIVE_CPU
    if _NATIVE_CPU is None:
        import mplus_fast.ops  # noqa: F401  (loads the native library)
        from mplus_fast.ops._library import has_native_kernel
        _NATIVE_CPU = has_native_kernel("rope_apply", "cpu")
    return _NATIVE_CPU


def engine_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """The fast backend's RoPE: the native `rope_apply` where it is measured faster than
    `apply_rope` (the CPU in float32: bench/results/ops-cpu-2026-12-01.md), `apply_rope` elsewhere
    (bf16 on the CPU, where the kernel is slower for large tensors; CUDA, not measured yet). Same
    semantics (HF Llama); the kernel's float32 cos/sin may differ from torch's by an ulp."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and _native_cpu_kernel():
        return torch.ops.mplus_fast.rope_apply(x, positions, inv_freq, scaling)
    return apply_rope(x, positions, inv_freq, scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0):
    """cos, sin of shape positions.shape + (dim,), computed in float32 then cast to `dtype`."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """x: (B, H, S, D); positions: (S,) or (B, S) int64. Hugging Face Llama semantics."""
    cos, sin = rope_cos_sin(positions, inv_freq, x.dtype, scaling)
    if cos.dim() == 2:  # (S, D) shared by the batch
        cos, sin = cos[None, None], sin[None, None]
    else:  # (B, S, D)
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin

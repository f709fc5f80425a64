"""Backbone building blocks in plain PyTorch (the reference arithmetic, SPEC §1 and §3).

Each function mirrors one step of the Hugging Face Llama layer as the M+ reference runs it, in
the same dtype discipline: RMSNorm in float32 then cast back, softmax in float32, everything else
in the activation dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mplus_fast.weights import LayerWeights

ACT = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
       "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def mlp(layer: LayerWeights, x: torch.Tensor, adapter: str | None, act: str) -> torch.Tensor:
    p = layer.proj
    return p["down_proj"](ACT[act](p["gate_proj"](x, adapter)) * p["up_proj"](x, adapter), adapter)


def selector(ws: list[torch.Tensor], x: torch.Tensor, act: str) -> torch.Tensor:
    """Linear(d→2s) → act → Linear(2s→s), or a single Linear(d→s); no biases."""
    if len(ws) == 1:
        return F.linear(x, ws[0])
    return F.linear(ACT[act](F.linear(x, ws[0])), ws[1])


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, S, H·D) -> (B, H, S, D)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, head_dim).transpose(1, 2)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def prefix_causal_mask(n: int, prefix: int, key_valid: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean (B or 1, 1, n, prefix + n): queries see the whole prefix and the tail causally
    (bottom-right aligned); `key_valid` (B, prefix + n) masks padding keys."""
    tail = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    mask = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=device), tail], dim=1)[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eager attention as the reference computes it: q (B,Hq,n,D), k/v (B,Hkv,S,D), mask bool
    (B|1, 1, n, S). Scores in the activation dtype, masked with finfo.min, softmax in float32."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n, D) -> (B, n, H·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)

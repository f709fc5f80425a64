"""Weight fusion for the fast backend: each adapter merged into fused projections (QKV, gate|up)
stored as (in, out) operands, and the encoder adapter as a low-rank correction on top of the
decoder's merged weights (`Projections`), so one merged copy of the large projections exists."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FusedLayer:
    """One layer's projections for one adapter, merged (W + scale·B·A), fused, as (in, out)
    operands of `x @ w` (`in_out`: row-major for float32 on the CPU, where the one-token decode
    GEMVs stream them near memory bandwidth; a transposed view elsewhere)."""
    wqkv: torch.Tensor   # (d, q_out + 2 kv_out)
    wkv: torch.Tensor    # (d, 2 kv_out): the K|V columns of wqkv (a view), for memory rows
    wo: torch.Tensor     # (q_out, d)
    wgu: torch.Tensor    # (d, 2 inter)
    wd: torch.Tensor     # (inter, d)


def fuse_layer(layer, adapter, q_out: int) -> FusedLayer:
    p = layer.proj
    wqkv = torch.cat([p["q_proj"].effective_weight(adapter), p["k_proj"].effective_weight(adapter), p["v_proj"].effective_weight(adapter)])
    wgu = torch.cat([p["gate_proj"].effective_weight(adapter), p["up_proj"].effective_weight(adapter)])
    wqkv_t = in_out(wqkv)
    wo = in_out(layer.o_proj)
    layer.o_proj = wo.t()    # o_proj has no adapter: the original becomes a view of `wo` (one copy)
    # wkv: a column view of wqkv, which BLAS reads as is: no copy.
    return FusedLayer(wqkv_t, wqkv_t[:, q_out:], wo, in_out(wgu), in_out(p["down_proj"].effective_weight(adapter)))


def in_out(w: torch.Tensor) -> torch.Tensor:
    """A weight stored (out, in), as the (in, out) operand of `x @ w`. float32 on the CPU: a
    row-major copy, which the decode GEMVs stream (see decode_gemv). Otherwise a transposed view
    of the row-major (out, in) weight: what cuBLAS and the CPU's bf16/fp16 GEMMs take directly (a
    row-major (in, out) bf16 weight runs ~40x slower on the CPU)."""
    if w.device.type == "cpu" and w.dtype == torch.float32:
        return w.t().contiguous()
    return w.contiguous().t()


GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "kv": ("k_proj", "v_proj"), "gu": ("gate_proj", "up_proj"),
          "d": ("down_proj",)}


class Projections:
    """One layer's projections under one adapter: `x @ W` with the fused, merged weights, plus for
    the encoder adapter the low-rank correction scale·(B_e A_e − B_d A_d) on top of the decoder's
    merged weights. So only ONE merged copy of the large projections exists (the decoder's, used
    by every read); injections pay four rank-r GEMMs per projection instead of a second copy."""

    def __init__(self, fused: FusedLayer, layer=None, adapter=None, base_adapter=None):
        self.fused = fused
        self.corr = {}
        if layer is not None:
            for group, names in GROUPS.items():
                parts = []
                for name in names:
                    lin = layer.proj[name]
                    if adapter in lin.adapters:
                        a_e, b_e = lin.adapters[adapter]
                        a_d, b_d = lin.adapters[base_adapter]
                        parts.append((in_out(a_e), in_out(b_e), in_out(a_d), in_out(b_d), lin.scale))
                    else:
                        parts.append(None)
                self.corr[group] = parts

    def _apply(self, group: str, x: torch.Tensor, w: torch.Tensor, mm) -> torch.Tensor:
        y = mm(x, w)
        parts = self.corr.get(group)
        if not parts or all(p is None for p in parts):
            return y
        outs = []
        for part, width in zip(parts, self._widths(group, y.shape[-1])):
            if part is None:
                outs.append(y.new_zeros(*y.shape[:-1], width))
            else:
                a_e, b_e, a_d, b_d, scale = part
                outs.append(((x @ a_e) @ b_e - (x @ a_d) @ b_d) * scale)
        return y + torch.cat(outs, dim=-1)

    def _widths(self, group, total):
        f = self.fused
        q_out = f.wqkv.shape[1] - f.wkv.shape[1]
        kv = f.wkv.shape[1] // 2
        return {"qkv": (q_out, kv, kv), "kv": (kv, kv), "gu": (total // 2, total // 2), "d": (total,)}[group]

    # `mm` computes x @ w: BLAS by default, `decode_matmul` for the rows of a decode step. The
    # choice is per call site, never per row count, so memory rows (STM, bank) get bit-identical
    # K/V however many are projected at once (save → reload → continue stays bit-exact).
    def qkv(self, x, mm=torch.matmul):
        return self._apply("qkv", x, self.fused.wqkv, mm)

    def kv(self, x, mm=torch.matmul):
        return self._apply("kv", x, self.fused.wkv, mm)

    def o(self, x, mm=torch.matmul):
        return mm(x, self.fused.wo)

    def gu(self, x, mm=torch.matmul):
        return self._apply("gu", x, self.fused.wgu, mm)

    def down(self, x, mm=torch.matmul):
        return self._apply("d", x, self.fused.wd, mm)

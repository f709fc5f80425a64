"""The CUDA tensor-core scoring kernel (csrc/kernels/retrieval.cuh, retrieval_scores_mma_kernel)
checked without a GPU: its tile constants are read from the header, then
  * the launch constraints a GPU would reject (dynamic shared memory <= 227 KB for every selector
    width it takes, WMMA's 32-byte fragment alignment and leading dimensions, the warp tiling
    covering the block tile, enough threads for the per-query and per-key steps), and
  * a model of its arithmetic in torch (the same key tiles, zero-padded query tiles, per-warp
    row groups summed row by row, the two row groups added, the mean rounded once) against the
    op's reference: bit-exact on dyadic inputs, within one bf16 ulp on random ones.
The CUDA selection kernel needs no model: it runs the code of csrc/kernels/topk_select.h, which
the CPU kernels run in every test.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from mplus_fast.ops.retrieval import retrieval_scores_reference

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "kernels" / "retrieval.cuh"
SMEM_LIMIT = 227 * 1024  # H100 / sm_90: max dynamic shared memory per block


def constants() -> dict:
    text = HEADER.read_text()
    found = dict(re.findall(r"\b(kMma\w+|kStageLd)\s*=\s*([^,;]+)[,;]", text))
    out: dict = {}
    for name, expr in found.items():  # in declaration order; later ones may use earlier ones
        out[name] = int(eval(expr.replace("//", "#"), {}, dict(out)))  # noqa: S307 (our own header)
    return out


C = constants()


def mma_ld(s: int) -> int:
    return math.ceil(s / 16) * 16 + 8


def smem_bytes(s: int) -> int:
    return (C["kMmaKeys"] + C["kMmaQueries"]) * mma_ld(s) * 2 + C["kMmaWarps"] * 32 * C["kStageLd"] * 4 \
        + C["kMmaQueries"] * 4


def test_header_constants_parsed():
    assert {"kMmaKeys", "kMmaQueries", "kMmaWarps", "kMmaThreads", "kMmaWarpCols", "kStageLd", "kMmaMaxS"} <= set(C)
    assert "mma_ld(int s) { return (s + 15) / 16 * 16 + 8; }" in HEADER.read_text(), "model of mma_ld is stale"


def test_launch_constraints():
    K, Q, W = C["kMmaKeys"], C["kMmaQueries"], C["kMmaWarps"]
    assert C["kMmaThreads"] == 32 * W and W * 32 * 32 == K * Q, "warps of 32 x 32 must tile the block tile"
    assert C["kMmaWarpCols"] * 32 == K and (W // C["kMmaWarpCols"]) * 32 == Q
    assert C["kMmaThreads"] >= max(K, Q), "one thread per key (final write) and per query (weights)"
    assert C["kStageLd"] % 4 == 0 and C["kStageLd"] >= 32  # WMMA float ldm: multiple of 4 (16 bytes)
    assert 2 * K <= W * 32 * C["kStageLd"], "the row-group reduction reuses the staging slabs"
    for s in range(1, C["kMmaMaxS"] + 1):
        ld = mma_ld(s)
        assert ld % 8 == 0, s  # WMMA 16-bit ldm: multiple of 8 elements
        assert smem_bytes(s) <= SMEM_LIMIT, f"s={s}: {smem_bytes(s)} bytes of shared memory"
        # fragment pointers (rows multiple of 16, depth multiple of 16) 32-byte aligned, for the
        # key tile at offset 0 and the query tile after K rows
        for base in (0, K * ld * 2):
            assert (base + 16 * ld * 2) % 32 == 0 and (base + 16 * 2) % 32 == 0, s
        stage = (K + Q) * ld * 2
        assert stage % 32 == 0 and (16 * C["kStageLd"] * 4) % 32 == 0 and (32 * C["kStageLd"] * 4) % 32 == 0
    assert smem_bytes(C["kMmaMaxS"] + 16) > SMEM_LIMIT, "kMmaMaxS is not the widest width that fits"


def mma_model(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, dtype) -> torch.Tensor:
    """The kernel's arithmetic: (B, n, s) queries x (M, s) keys -> (B, M) rounded scores."""
    K, Q = C["kMmaKeys"], C["kMmaQueries"]
    B, n, s = q.shape
    M = keys.shape[0]
    sp, nb, nt = math.ceil(s / 16) * 16, math.ceil(M / K), math.ceil(n / Q)
    kp = torch.zeros(nb * K, sp)
    kp[:M, :s] = keys.float()
    qp = torch.zeros(B, nt * Q, sp)
    qp[:, :n, :s] = q.float()
    w = torch.zeros(B, nt * Q, dtype=torch.bool)
    w[:, :n] = True if mask is None else mask
    rnd = lambda x: x.to(dtype).float()  # noqa: E731
    term = rnd(torch.sigmoid(rnd(qp @ kp.T)))  # (B, nt*Q, nb*K): the staged tile, per element
    term = torch.where(w[:, :, None], term, torch.zeros(()))
    groups = Q // 32
    colsum = torch.zeros(B, groups, nb * K)
    for t in range(nt):  # each lane: its row group's 32 rows in order, tile after tile
        for r in range(32):
            for g in range(groups):
                colsum[:, g] += term[:, t * Q + g * 32 + r]
    total = colsum[:, 0]
    for g in range(1, groups):
        total = total + colsum[:, g]
    count = w.sum(1, keepdim=True).float()
    mean = torch.where(count > 0, rnd(total / count.clamp_min(1)), torch.zeros(()))
    return mean[:, :M]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,n,M,s", [(1, 1, 1, 1), (2, 70, 300, 37), (1, 130, 129, 256), (1, 64, 128, 16)])
def test_model_matches_reference(dtype, B, n, M, s):
    g = torch.Generator().manual_seed(n + M)
    mask = torch.rand(B, n, generator=g) > 0.3
    qd = (torch.randint(-4, 5, (B, n, s), generator=g) / 8).to(dtype)
    kd = (torch.randint(-4, 5, (M, s), generator=g) / 8).to(dtype)
    for m in (None, mask):  # dyadic: exact in any summation order
        assert torch.equal(mma_model(qd, kd, m, dtype), retrieval_scores_reference(qd, kd, None, m))
    q = (torch.randn(B, n, s, generator=g) / s ** 0.5).to(dtype)
    k = torch.randn(M, s, generator=g).to(dtype)
    got, want = mma_model(q, k, mask, dtype), retrieval_scores_reference(q, k, None, mask)
    assert (got - want).abs().max() <= 2 ** -8

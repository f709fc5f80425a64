"""Top-k by selection, returned in index order: the second half of retrieval, on its own.

    topk_ascending(scores, k) -> (indices, values)

scores   (B, n) float32
k        int in [0, n]
returns  indices (B, k) int64, SORTED ASCENDING, and values (B, k) float32 = scores at them.

The k largest scores of each row; ties at the k-th place go to the lower index (SPEC §3); NaN
ranks as -inf, -0 as +0. This is retrieval's top-R rule (`mplus_fast.retrieval.top_r_ascending`)
for any score vector, e.g. the Triton scoring kernel's.

Kernels: the reference below sorts (stable, descending) and keeps the first k. Native CPU
(csrc/ops/topk.cpp) and CUDA (csrc/ops/topk_cuda.cu + csrc/kernels/topk.cuh) run one algorithm
written once in csrc/kernels/topk_select.h: a radix select on the scores' order-preserving bits
(one 8-bit digit per pass) and a stable compaction, no sort, by a thread team (an OpenMP team on
the CPU, a CUDA block per row on the GPU). retrieval_topk's native kernels call it directly.
"""
from __future__ import annotations

import torch

from mplus_fast import retrieval as retrieval_semantics
from mplus_fast.ops._library import define_op

SCHEMA = "topk_ascending(Tensor scores, int k) -> (Tensor indices, Tensor values)"


def check_args(scores: torch.Tensor, k: int) -> None:
    """The reference's checks (csrc/ops/topk.cpp makes the same ones)."""
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"topk_ascending: scores must be (B, n) float32, got {tuple(scores.shape)} {scores.dtype}")
    if not 0 <= k <= scores.shape[1]:
        raise ValueError(f"topk_ascending: k={k} must be in [0, n={scores.shape[1]}] (scores {tuple(scores.shape)})")


def topk_ascending_reference(scores: torch.Tensor, k: int):
    check_args(scores, k)
    ranked = torch.where(scores.isnan(), float("-inf"), scores)
    indices = retrieval_semantics.top_r_ascending(ranked, k)  # (B, k), ties: lower index
    return indices, torch.gather(scores, 1, indices)


def _fake(scores, k):
    check_args(scores, k)
    b = scores.shape[0]
    return scores.new_empty((b, k), dtype=torch.int64), scores.new_empty((b, k))


topk_ascending = define_op(SCHEMA, topk_ascending_reference, _fake)

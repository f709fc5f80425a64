"""Op 1, retrieval: top-k long-term-memory keys by mean sigmoid score (SPEC §3, step 1).

    retrieval_topk(queries, keys, extra_keys, k, query_mask=None) -> (indices, scores)

queries     (B, n, s) float32 / bfloat16 / float16
keys        (M, s)    same dtype: the LTM retrieval keys, M >= 1
extra_keys  (E, s)    same dtype, or None: the pending buffer; key index M + j is extra row j
k           int >= 0  number of keys to return (R in the SPEC)
query_mask  (B, n)    bool, or None; False marks a padding query, left out of the mean
returns     indices (B, k) int64 and scores (B, k) float32

score_j = mean over the unmasked queries q of sigmoid(q · key_j): no 1/sqrt(s) scale. Precision
(SPEC §10): float32 inputs score in float32. bf16/fp16 inputs score as the authors' code does in
that dtype: q · key_j accumulated in float32 and rounded once to the dtype, sigmoid of that rounded
to the dtype, the mean over the unmasked queries summed in float32 and rounded once to the dtype.
The returned scores are those rounded values (as float32). The k best keys of [keys; extra_keys]
are returned with indices SORTED ASCENDING. Ties at the k-th place go to the lower index (exact
ties are the rule in bf16: dozens of keys can share the cut score). A batch row with no query
(n = 0, or all masked) scores 0 everywhere (so it gets indices 0..k-1).
SPEC §3 special case: when M < k (extra keys not counted) nothing is scored: indices are
arange(M) repeated end to end, cut to the LAST k entries (M=3, k=7 -> 2,0,1,2,0,1,2; this exact
order, not sorted), the extra block is ignored and scores are 0. M == 0 is an error.

Kernels: `retrieval_topk_reference` below is the truth (it materialises the B x n x (M+E) score
matrix). Native CPU (csrc/ops/retrieval.cpp): key chunks in parallel, one small float32 GEMM per
chunk, the rounding steps, sigmoid and a running column sum, never more than threads x n x chunk
floats of scores. Native CUDA (csrc/ops/retrieval_cuda.cu + csrc/kernels/retrieval.cuh): bf16/fp16
on tensor cores (WMMA 16x16x16, float32 accumulation; a block keeps its key tile in shared memory
for all query tiles; sigmoid, rounding and the masked column mean fused, the n x M matrix never
written), float32 (or a selector wider than 496) on the CUDA cores. Top-k on both: the selection of
`topk_ascending` (mplus_fast/ops/topk.py: radix select + stable compaction, no sort). Triton
(mplus_fast/ops/triton/retrieval.py): the same scoring with tl.dot, not registered with the
dispatcher; chosen explicitly with `retrieval_topk(..., impl="triton")`.
"""
from __future__ import annotations

import torch

from mplus_fast import retrieval as retrieval_semantics
from mplus_fast.ops._library import define_op
from mplus_fast.ops.topk import topk_ascending_reference

SCHEMA = (
    "retrieval_topk(Tensor queries, Tensor keys, Tensor? extra_keys, int k, Tensor? query_mask=None)"
    " -> (Tensor indices, Tensor scores)"
)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {t.dtype}"


def check_args(queries, keys, extra_keys, k, query_mask) -> None:
    """Argument checks of the reference (the native kernels make the same checks in C++)."""
    if queries.dim() != 3 or queries.dtype not in FLOAT_DTYPES:
        raise ValueError(f"retrieval_topk: queries must be (B, n, s) float, got {_shape(queries)}")
    if keys.dim() != 2 or keys.dtype != queries.dtype or keys.shape[1] != queries.shape[2]:
        raise ValueError(f"retrieval_topk: keys must be (M, s={queries.shape[2]}) {queries.dtype}, got {_shape(keys)}")
    if keys.shape[0] == 0:
        raise ValueError(f"retrieval_topk: keys is empty (shape {tuple(keys.shape)}); M must be >= 1")
    if extra_keys is not None and (extra_keys.dim() != 2 or extra_keys.dtype != keys.dtype
                                   or extra_keys.shape[1] != keys.shape[1]):
        raise ValueError(f"retrieval_topk: extra_keys must be (E, s={keys.shape[1]}) {keys.dtype}, got {_shape(extra_keys)}")
    if query_mask is not None and (query_mask.dtype != torch.bool or tuple(query_mask.shape) != tuple(queries.shape[:2])):
        raise ValueError(f"retrieval_topk: query_mask must be (B, n)={tuple(queries.shape[:2])} bool, got {_shape(query_mask)}")
    if k < 0:  # k <= M <= M + E, or M < k (the cyclic case): any k >= 0 is valid
        raise ValueError(f"retrieval_topk: k={k} must be >= 0 (keys {tuple(keys.shape)})")


def cyclic_indices(m: int, k: int, batch: int, device) -> torch.Tensor:
    """SPEC §3, M < k (mplus_fast.retrieval.cyclic_indices), one row per batch item."""
    return retrieval_semantics.cyclic_indices(m, k).to(device).expand(batch, k).contiguous()


def retrieval_scores_reference(queries, keys, extra_keys=None, query_mask=None) -> torch.Tensor:
    """(B, M+E) float32 mean-sigmoid scores, rounded where SPEC §10 rounds; materialises
    (B, n, M+E) (that is why it is the reference)."""
    allk = keys if extra_keys is None else torch.cat([keys, extra_keys])
    dtype = queries.dtype
    # In bf16/fp16 this is the authors' own expression: torch's low-precision GEMM accumulates in
    # float32 and rounds once, and its sigmoid rounds to the dtype.
    sig = torch.sigmoid(queries @ allk.T)  # (B, n, M+E), dtype
    if query_mask is None:
        w = torch.ones(queries.shape[:2], dtype=torch.float32, device=queries.device)
    else:
        w = query_mask.to(torch.float32)  # (B, n)
    # The mean: a float32 sum, divided by the count, rounded once to the dtype. No query at all
    # (n = 0 or all masked): score 0, not 0/0.
    mean = (sig.float() * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    return mean.to(dtype).float()


def retrieval_topk_reference(queries, keys, extra_keys=None, k: int = 1, query_mask=None):
    check_args(queries, keys, extra_keys, k, query_mask)
    batch, m = queries.shape[0], keys.shape[0]
    if m < k:
        return cyclic_indices(m, k, batch, queries.device), queries.new_zeros((batch, k), dtype=torch.float32)
    scores = retrieval_scores_reference(queries, keys, extra_keys, query_mask)  # (B, M+E)
    return topk_ascending_reference(scores, k)  # ties: the lower index wins; indices ascending


def _fake(queries, keys, extra_keys, k, query_mask=None):
    b = queries.shape[0]
    return queries.new_empty((b, k), dtype=torch.int64), queries.new_empty((b, k), dtype=torch.float32)


retrieval_topk_op = define_op(SCHEMA, retrieval_topk_reference, _fake)


def retrieval_topk(queries, keys, extra_keys=None, k: int = 1, query_mask=None, impl: str = "op"):
    """Public entry point. impl="op": torch.ops.mplus_fast.retrieval_topk (native CPU/CUDA kernel
    when loaded, else the reference); impl="triton": the Triton scoring kernel (CUDA tensors)."""
    if impl == "triton":
        from mplus_fast.ops.triton.retrieval import retrieval_topk_triton

        return retrieval_topk_triton(queries, keys, extra_keys, k, query_mask)
    if impl != "op":
        raise ValueError(f"retrieval_topk: impl must be 'op' or 'triton', got {impl!r}")
    return torch.ops.mplus_fast.retrieval_topk(queries, keys, extra_keys, k, query_mask)

"""The Triton retrieval kernel under TRITON_INTERPRET=1 (float32, tiny shapes), in a subprocess so
the interpreter setting does not leak into the rest of the suite; on CUDA, directly."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

_CHILD = r"""
import torch
from mplus_fast.ops.retrieval import retrieval_topk_reference, retrieval_scores_reference
from mplus_fast.ops.triton.retrieval import retrieval_topk_triton, retrieval_scores_triton
g = torch.Generator().manual_seed(0)
for (B, n, M, E, s, k) in [(1, 1, 1, 0, 1, 1), (2, 7, 83, 5, 37, 7), (1, 70, 130, 3, 16, 20)]:
    q = torch.randn(B, n, s, generator=g) / 4
    keys, extra = torch.randn(M, s, generator=g), torch.randn(E, s, generator=g)
    mask = torch.rand(B, n, generator=g) > 0.3
    for m in (None, mask):
        got = retrieval_scores_triton(q, keys, extra, m)
        want = retrieval_scores_reference(q, keys, extra, m)
        err = (got - want).abs().max().item()
        assert err <= 2e-5, (B, n, M, E, s, err)
        i, sc = retrieval_topk_triton(q, keys, extra, k, m)
        ri, rs = retrieval_topk_reference(q, keys, extra, k, m)
        assert torch.equal(i, ri), (i, ri)
assert retrieval_topk_triton(q, keys[:3], extra, 7)[0][0].tolist() == [2, 0, 1, 2, 0, 1, 2]
print("TRITON-OK")
"""


def test_triton_interpreter_parity():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert "TRITON-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_parity(dtype):
    from mplus_fast.ops.retrieval import retrieval_scores_reference
    from mplus_fast.ops.triton.retrieval import retrieval_scores_triton

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 83, 256, generator=g) / 16).to(dtype).cuda()
    keys = torch.randn(989, 256, generator=g).to(dtype).cuda()
    got = retrieval_scores_triton(q, keys, keys[:7])
    want = retrieval_scores_reference(q, keys, keys[:7])
    # float32 inputs use IEEE products (no TF32); bf16 products are exact in float32
    assert (got - want).abs().max().item() <= 2e-5

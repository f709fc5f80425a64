"""The Triton retrieval kernel under TRITON_INTERPRET=1 (tiny shapes), in a subprocess so the
interpreter setting does not leak into the rest of the suite; compiled ahead of time for sm_90
(no GPU needed); on CUDA, directly.

The interpreter's bf16 tl.dot is not trustworthy, so the SPEC §10 rounding is exercised with
float32 inputs holding bf16/fp16 values and `round_to` set: the same arithmetic (their products
are exact in float32), compared with the reference run in the real dtype.
"""
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
    for dt in (torch.bfloat16, torch.float16):  # dyadic values: every float32 sum is exact
        qd = (torch.randint(-4, 5, (B, n, s), generator=g) / 8).to(dt)
        kd = (torch.randint(-4, 5, (3, s), generator=g) / 8)[torch.randint(0, 3, (M,), generator=g)].to(dt)
        ed = (torch.randint(-4, 5, (E, s), generator=g) / 8).to(dt)
        for m in (None, mask):
            got = retrieval_scores_triton(qd.float(), kd.float(), ed.float(), m, round_to=dt)
            want = retrieval_scores_reference(qd, kd, ed, m)
            assert torch.equal(got, want), (dt, B, n, M, s, (got - want).abs().max().item())
            i, _ = retrieval_topk_triton(qd.float(), kd.float(), ed.float(), k, m, round_to=dt)
            assert torch.equal(i, retrieval_topk_reference(qd, kd, ed, k, m)[0]), dt
assert retrieval_topk_triton(q, keys[:3], extra, 7)[0][0].tolist() == [2, 0, 1, 2, 0, 1, 2]
print("TRITON-OK")
"""


def test_triton_interpreter_parity():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert "TRITON-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.slow
def test_triton_compiles_for_sm90():
    """Ahead-of-time compile of the bf16 scoring kernel for Hopper down to cubin (triton's ptxas),
    no GPU needed: catches what the interpreter cannot (typing, layouts, shared memory)."""
    import triton
    from triton.backends import backends
    if "nvidia" not in backends or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton's nvidia backend is not available")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mplus_fast.ops.triton import retrieval as kernels

    fn = kernels._scores_kernel
    consts = dict(HAS_MASK=True, PRECISION="tf32", ROUND=1, LIBDEVICE=True, BLOCK_Q=64, BLOCK_K=64, BLOCK_S=32)
    ptr = {"q_ptr": "*bf16", "k_ptr": "*bf16", "mask_ptr": "*u8", "cnt_ptr": "*fp32", "out_ptr": "*fp32"}
    sig = {a: "constexpr" if a in consts else ptr.get(a, "i32") for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    assert compiled.metadata.shared <= 227 * 1024


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
    if dtype == torch.float32:  # IEEE products (no TF32)
        assert (got - want).abs().max().item() <= 2e-5
    else:  # rounded scores: at most one bf16 ulp where a float32 sum crosses a rounding boundary
        diff = (got - want).abs()
        assert diff.max().item() <= 2 ** -8 and (diff > 0).float().mean().item() <= 1e-3

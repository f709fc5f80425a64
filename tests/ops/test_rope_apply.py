"""mplus_fast::rope_apply: parity with the HF-semantics reference, opcheck, argument errors."""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401  (defines the ops, loads the native library)
from mplus_fast.ops.rope import rope_apply_reference
from mplus_fast.ops.testing import needs_native

OP = torch.ops.mplus_fast.rope_apply
CUDA = torch.cuda.is_available()

# One tolerance per dtype. The native kernels round cos/sin, each product and the sum to x.dtype
# exactly as the reference does; they differ only where their float32 cos/sin differs from torch's
# (glibc / CUDA libm vs Sleef) by one ulp. fp32: that ulp times |x| (~1e-6 for |x| < 8). bf16/fp16:
# such an ulp flips the rounded cos/sin in a handful of elements, by one ulp of the dtype:
# atol = eps(dtype) * max|x|, and at most `max_mismatch` of the elements may differ at all.
TOL = {
    torch.float32: dict(atol=2e-6, rtol=1e-6, max_mismatch=1.0),
    torch.bfloat16: dict(atol=2 ** -7 * 8, rtol=2 ** -7, max_mismatch=1e-3),
    torch.float16: dict(atol=2 ** -10 * 8, rtol=2 ** -10, max_mismatch=1e-3),
}


def inv_freq_for(D: int, base: float = 500000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def make(B, H, S, D, dtype, device="cpu", batched_pos=False, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # (B, S, H, D) storage viewed as (B, H, S, D)
        x = torch.randn(B, S, H, D, generator=g).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, S, D, generator=g).to(dtype)
    pos = torch.randint(0, 20000, (B, S) if batched_pos else (S,), generator=g)
    return x.to(device), pos.to(device), inv_freq_for(D).to(device)


def assert_close(got, want, dtype, name="out"):
    tol = TOL[dtype]
    diff = (got.float() - want.float()).abs()
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    if diff.numel() == 0:
        return
    bound = tol["atol"] + tol["rtol"] * want.float().abs()
    worst = int(torch.argmax(diff - bound))
    assert bool((diff <= bound).all()), (
        f"{name}: max error {diff.max().item():.3g} at flat index {worst} (got {got.flatten()[worst].item()}, "
        f"want {want.flatten()[worst].item()})")
    frac = (diff > 0).float().mean().item()
    assert frac <= tol["max_mismatch"], f"{name}: {frac:.2%} of elements differ (> {tol['max_mismatch']:.2%})"


CASES = [  # (B, H, S, D, batched positions, non-contiguous)
    (1, 1, 1, 2, False, False),
    (2, 3, 7, 6, True, False),  # odd half width
    (1, 4, 83, 64, False, True),
    (2, 2, 989, 10, True, True),
    (1, 8, 33, 128, True, False),
]


@needs_native("rope_apply")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("-bpos" if c[4] else "") + ("-nc" if c[5] else ""))
@pytest.mark.parametrize("scaling", [1.0, 1.2345])
def test_parity_cpu(case, dtype, scaling):
    B, H, S, D, bpos, nc = case
    x, pos, freq = make(B, H, S, D, dtype, batched_pos=bpos, noncontig=nc)
    got = OP(x, pos, freq, scaling)
    assert got.is_contiguous()
    assert_close(got, rope_apply_reference(x, pos, freq, scaling), dtype)


def test_fp32_reference_is_hf_formula():
    """The reference against an independent transcription of HF's apply_rotary_pos_emb."""
    x, pos, freq = make(2, 3, 11, 16, torch.float32, batched_pos=True)
    freqs = (freq[None, :, None] @ pos[:, None, :].float()).transpose(1, 2)  # HF: inv_freq @ position_ids
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    rot = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)
    torch.testing.assert_close(rope_apply_reference(x, pos, freq), x * cos + rot * sin, atol=0, rtol=0)


@needs_native("rope_apply")
def test_native_cpu_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mplus_fast::rope_apply", "CPU")


@pytest.mark.parametrize("shape", [(0, 2, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8)])
def test_empty(shape):
    B, H, S, D = shape
    x, pos, freq = make(B, H, S, D, torch.float32)
    assert OP(x, pos, freq).shape == shape


def test_opcheck():
    x, pos, freq = make(2, 3, 7, 8, torch.bfloat16, batched_pos=True, noncontig=True)
    torch.library.opcheck(OP.default, (x, pos, freq, 1.0))


@pytest.mark.parametrize("bad, match", [
    (dict(pos=torch.zeros(6, dtype=torch.int64)), r"positions .*\(7,\)"),
    (dict(pos=torch.zeros(7, dtype=torch.int32)), "positions"),
    (dict(freq=torch.ones(3)), r"inv_freq .*\(4,\)"),
    (dict(freq=torch.ones(4, dtype=torch.float64)), "inv_freq"),
    (dict(x=torch.randn(2, 3, 7, 7)), r"D must be even.*7"),
    (dict(x=torch.randn(3, 7, 8)), r"x must be \(B, H, S, D\)"),
])
def test_bad_arguments(bad, match):
    x, pos, freq = make(2, 3, 7, 8, torch.float32)
    args = dict(x=x, pos=pos, freq=freq) | bad
    with pytest.raises((RuntimeError, ValueError), match=match):
        OP(args["x"], args["pos"], args["freq"])
    with pytest.raises(ValueError, match=match):
        rope_apply_reference(args["x"], args["pos"], args["freq"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@needs_native("rope_apply", "cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_parity_cuda(case, dtype):
    B, H, S, D, bpos, nc = case
    x, pos, freq = make(B, H, S, D, dtype, device="cuda", batched_pos=bpos, noncontig=nc)
    assert_close(OP(x, pos, freq, 1.1), rope_apply_reference(x, pos, freq, 1.1), dtype)

"""mplus_fast::decode_gemv / decode_attention: parity with the references (float64 truth for the
tolerance), awkward shapes, non-contiguous inputs, empty, opcheck, argument errors."""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.decode import decode_attention_reference, decode_gemv_reference
from mplus_fast.ops.testing import needs_native

# dtype -> (atol, rtol) against the reference computed in float64 and rounded to the dtype:
# float32 accumulations of ≤ 3,000 terms; bf16/fp16 one rounding of the output (plus the
# reference's own low-precision accumulation).
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
GEMV, ATT = torch.ops.mplus_fast.decode_gemv, torch.ops.mplus_fast.decode_attention
native_gemv, native_att = needs_native("decode_gemv"), needs_native("decode_attention")


def _close(actual, truth, dtype, what):
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype and actual.shape == truth.shape, what
    torch.testing.assert_close(actual.double(), truth.double(), atol=atol * truth.abs().max().clamp_min(1).item(),
                               rtol=rtol, msg=lambda m: f"{what}: {m}")


@native_gemv
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 7, 83), (3, 989, 130), (1, 64, 4096), (8, 83, 7), (2, 1024, 1536)])
def test_gemv_parity(M, K, N, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
    truth = x.double() @ w.double()
    _close(GEMV(x, w), truth, dtype, f"decode_gemv {M}x{K}x{N}")
    _close(decode_gemv_reference(x, w), truth, dtype, "reference")


@native_gemv
def test_gemv_noncontiguous_and_empty():
    x = torch.randn(5, 40)[::2, :33]              # row stride 80
    w = torch.randn(60, 33).t()                   # (33, 60) column-major: made contiguous inside
    torch.testing.assert_close(GEMV(x, w), x @ w, atol=1e-5, rtol=1e-5)
    assert GEMV(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)
    assert torch.equal(GEMV(torch.randn(2, 0), torch.randn(0, 3)), torch.zeros(2, 3))


def _att_inputs(B, Hq, Hkv, S, D, dtype, seed=0, holes=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, S, generator=g) > (0.3 if holes else -1)
    valid[:, 0] = True                            # bos: every sequence attends something
    return q, k, v, valid


def _att_truth(q, k, v, valid, scale):
    B, Hq, _, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ vv


@native_att
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("B,Hq,Hkv,S,D", [(1, 1, 1, 1, 8), (1, 16, 4, 989, 64), (3, 6, 2, 83, 12), (2, 8, 8, 7, 32),
                                          (1, 32, 8, 3000, 128), (2, 4, 1, 600, 16)])
def test_attention_parity(B, Hq, Hkv, S, D, dtype):
    q, k, v, valid = _att_inputs(B, Hq, Hkv, S, D, dtype, seed=S)
    scale = D ** -0.5
    truth = _att_truth(q, k, v, valid, scale)
    _close(ATT(q, k, v, valid, scale), truth, dtype, "decode_attention")
    _close(decode_attention_reference(q, k, v, valid, scale), truth, dtype, "reference")


def _shared_truth(q, k, v, valid, ks, vs, scale):
    B = q.shape[0]
    kk, vv = torch.cat([ks.expand(B, -1, -1, -1), k], 2), torch.cat([vs.expand(B, -1, -1, -1), v], 2)
    return _att_truth(q, kk, vv, torch.cat([valid.new_ones(B, ks.shape[2]), valid], 1), scale)


@native_att
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("B,Hq,Hkv,P,S,D", [(1, 1, 1, 1, 1, 8), (1, 16, 4, 2561, 720, 64), (3, 6, 2, 83, 7, 12),
                                            (2, 8, 8, 7, 300, 32), (4, 32, 8, 989, 600, 128), (5, 4, 1, 600, 16, 16)])
def test_attention_shared_prefix_parity(B, Hq, Hkv, P, S, D, dtype):
    """[shared prefix (1, Hkv, P, D), all visible | own cache]: one softmax over both."""
    q, k, v, valid = _att_inputs(B, Hq, Hkv, S, D, dtype, seed=P + S)
    g = torch.Generator().manual_seed(P)
    ks, vs = (torch.randn(1, Hkv, P, D, generator=g).to(dtype) for _ in range(2))
    scale = D ** -0.5
    truth = _shared_truth(q, k, v, valid, ks, vs, scale)
    _close(ATT(q, k, v, valid, scale, ks, vs), truth, dtype, "decode_attention (shared)")
    _close(decode_attention_reference(q, k, v, valid, scale, ks, vs), truth, dtype, "reference (shared)")


@native_att
def test_attention_shared_prefix_bf16_error_budget():
    """bf16: the error against a float32 truth within 2x that of the same-precision reference."""
    q, k, v, valid = _att_inputs(3, 16, 4, 700, 64, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    ks, vs = (torch.randn(1, 4, 2561, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    truth = decode_attention_reference(q.float(), k.float(), v.float(), valid, 0.125, ks.float(), vs.float())
    err = lambda a: float((a.float() - truth).abs().max() / truth.abs().max())
    same_precision = err(decode_attention_reference(q, k, v, valid, 0.125, ks, vs))
    assert err(ATT(q, k, v, valid, 0.125, ks, vs)) <= 2 * same_precision


@native_att
def test_attention_shared_prefix_noncontiguous_and_no_own_key():
    q, k, v, valid = _att_inputs(2, 8, 2, 300, 16, torch.float32)
    qv = torch.randn(2, 1, 8 * 16).view(2, 1, 8, 16).transpose(1, 2)   # split_heads layout
    big = torch.randn(3, 2, 500, 16)
    ks, vs = big[1:2, :, :400], big[2:3, :, 100:]                       # views of a larger buffer
    valid[1] = False                                                    # sequence 1 sees the prefix only
    got = ATT(qv, k, v, valid, 0.25, ks, vs)
    torch.testing.assert_close(got, decode_attention_reference(qv, k, v, valid, 0.25, ks, vs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], decode_attention_reference(qv[1:], ks, vs, torch.ones(1, 400, dtype=torch.bool),
                                                                   0.25), atol=1e-5, rtol=1e-5)


@native_att
def test_attention_noncontiguous_views():
    q, k, v, valid = _att_inputs(2, 8, 2, 300, 16, torch.float32)
    qv = torch.randn(2, 1, 8 * 16).view(2, 1, 8, 16).transpose(1, 2)   # split_heads layout
    kc, vc = torch.randn(2, 2, 400, 16), torch.randn(2, 2, 400, 16)
    k2, v2 = kc[:, :, :300], vc[:, :, :300]                             # a static cache's prefix
    got = ATT(qv, k2, v2, valid, 0.25)
    torch.testing.assert_close(got, decode_attention_reference(qv, k2, v2, valid, 0.25), atol=1e-5, rtol=1e-5)


@native_att
def test_attention_row_with_no_valid_key_is_zero_like_sdpa():
    q, k, v, valid = _att_inputs(2, 4, 2, 50, 8, torch.float32)
    valid[1] = False
    out = ATT(q, k, v, valid, 0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, valid, 0.3), atol=1e-6, rtol=1e-5)


@native_att
def test_attention_empty_batch():
    q, k, v, valid = _att_inputs(1, 4, 2, 10, 8, torch.float32)
    assert ATT(q[:0], k[:0], v[:0], valid[:0], 0.3).shape == (0, 4, 1, 8)


def test_opcheck():
    torch.library.opcheck(GEMV.default, (torch.randn(2, 33), torch.randn(33, 70)))
    torch.library.opcheck(ATT.default, (*_att_inputs(2, 8, 2, 300, 16, torch.float32), 0.25))
    torch.library.opcheck(ATT.default, (*_att_inputs(1, 4, 4, 30, 8, torch.bfloat16), 0.25))
    torch.library.opcheck(ATT.default, (*_att_inputs(2, 8, 2, 40, 16, torch.float32), 0.25, torch.randn(1, 2, 70, 16),
                                        torch.randn(1, 2, 70, 16)))


@pytest.mark.parametrize("impl", [pytest.param(GEMV, marks=native_gemv), decode_gemv_reference])
@pytest.mark.parametrize("x,w,match", [
    (torch.randn(2, 3, 4), torch.randn(4, 5), "x must be"),
    (torch.randn(2, 4), torch.randn(3, 5), r"w must be \(K=4"),
    (torch.randn(2, 4), torch.randn(4, 5, dtype=torch.float64), "w must be"),
    (torch.randint(0, 3, (2, 4)), torch.randint(0, 3, (4, 5)), "x must be"),
])
def test_gemv_bad_arguments(impl, x, w, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        impl(x, w)


def _bad(change):
    q, k, v, valid = _att_inputs(2, 8, 2, 30, 16, torch.float32)
    args = dict(q=q, k=k, v=v, valid=valid)
    args.update(change(args))
    return args


@pytest.mark.parametrize("impl", [pytest.param(ATT, marks=native_att), decode_attention_reference])
@pytest.mark.parametrize("change,match", [
    (lambda a: {"q": a["q"].expand(2, 8, 2, 16)}, r"q must be \(B, Hq, 1, D\)"),
    (lambda a: {"k": a["k"][:, :, :, :8], "v": a["v"][:, :, :, :8]}, "k must be"),
    (lambda a: {"k": torch.randn(2, 3, 30, 16), "v": torch.randn(2, 3, 30, 16)}, "divisible by"),
    (lambda a: {"v": a["v"][:, :, :29]}, "v must have k's shape"),
    (lambda a: {"valid": a["valid"][:, :29]}, "valid must be bool"),
    (lambda a: {"valid": a["valid"].float()}, "valid must be bool"),
])
def test_attention_bad_arguments(impl, change, match):
    a = _bad(change)
    with pytest.raises((ValueError, RuntimeError), match=match):
        impl(a["q"], a["k"], a["v"], a["valid"], 0.25)


@pytest.mark.parametrize("impl", [pytest.param(ATT, marks=native_att), decode_attention_reference])
@pytest.mark.parametrize("ks,vs,match", [
    (torch.randn(1, 2, 9, 16), None, "given together"),
    (torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), r"k_shared must be \(1, Hkv=2"),
    (torch.randn(1, 4, 9, 16), torch.randn(1, 4, 9, 16), "k_shared must be"),
    (torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), "k_shared must be"),
    (torch.randn(1, 2, 9, 16).bfloat16(), torch.randn(1, 2, 9, 16).bfloat16(), "k_shared must be"),
    (torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16), "v_shared must have"),
])
def test_attention_shared_bad_arguments(impl, ks, vs, match):
    q, k, v, valid = _att_inputs(2, 8, 2, 30, 16, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=match):
        impl(q, k, v, valid, 0.25, ks, vs)

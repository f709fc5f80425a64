"""mplus_fast::memory_attention and ::merge_attention_states: parity with the explicit fp32
reference (the truth), merge exactness, padding, opcheck, argument errors; the Triton kernels under
TRITON_INTERPRET=1 (in a subprocess: the interpreter must be chosen before the kernels are
defined, and must not leak into the rest of the suite); CUDA (Triton) when a GPU is present.

Run as a script (`python tests/ops/test_attention.py --interpret-cases`) it executes the Triton cases
and prints their errors as JSON; the test below does that with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()

# One tolerance per dtype (outputs vs the fp32 truth computed from the same low-precision inputs).
# The kernels accumulate in fp32 and round once to the output dtype: the error budget is about one
# output ulp (rtol = 2 eps) plus fp32 reassociation noise. lse is always fp32; for bf16/fp16 with
# RoPE on load a key element can differ by one ulp where libm's and torch's cos differ (see
# test_rope.py), hence the looser lse bound there.
TOL = {
    torch.float32: dict(atol=2e-6, rtol=1e-5, lse=5e-6),
    torch.bfloat16: dict(atol=1e-2, rtol=2 ** -6, lse=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2 ** -9, lse=1e-4),
}


def make_inputs(B=2, Hq=4, Hkv=2, n=7, D=16, P_src=11, P=None, index=False, rope=False, mask=False,
                shared=False, noncontig=False, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        if noncontig:  # (d0, d2, d1, d3) storage viewed as (d0, d1, d2, d3)
            return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).to(dtype).transpose(1, 2).to(device)
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    q, kt, vt = rnd(B, Hq, n, D), rnd(B, Hkv, n, D), rnd(B, Hkv, n, D)
    kp, vp = rnd(1 if shared else B, Hkv, P_src, D), rnd(1 if shared else B, Hkv, P_src, D)
    P = P_src if P is None else P
    idx = torch.randint(0, max(P_src, 1), (B, P), generator=g).to(device) if index else None
    pos = torch.randint(0, 16000, (B, P) if index else (P,), generator=g).to(device) if rope else None
    freq = (1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device) if rope else None
    tmask = None
    if mask:  # left padding: sequence b starts at pad[b]
        pad = torch.randint(0, n, (B, 1), generator=g)
        tmask = (torch.arange(n)[None] >= pad).to(device)
    return (q, kp, vp, idx, pos, freq, kt, vt, tmask, D ** -0.5)


CASES = {  # name: make_inputs kwargs
    "n1-P0": dict(n=1, P_src=0, B=1),
    "n7-P11": dict(),
    "n7-gather-rope-mask": dict(index=True, rope=True, mask=True, P=13),
    "n83-gqa4-shared-rope": dict(n=83, Hq=8, Hkv=2, P_src=37, rope=True, shared=True, D=32),
    "n83-mha-odd-width-noncontig": dict(n=83, Hq=3, Hkv=3, D=7, P_src=50, noncontig=True, mask=True),
    "n33-mqa-gather-shared": dict(n=33, Hq=4, Hkv=1, P_src=600, P=300, index=True, shared=True, D=64),
    "n989-P0-mask": dict(n=989, B=1, Hq=2, Hkv=1, D=8, P_src=0, mask=True),
    "n5-P700": dict(n=5, Hq=2, Hkv=2, P_src=700, D=128, rope=True),
}
INTERPRET_CASES = ["n1-P0", "n7-P11", "n7-gather-rope-mask", "n83-mha-odd-width-noncontig"]


def compare(got, want, dtype):
    """Max errors of out and lse (finite lse only), and whether -inf lse agree."""
    (o, l), (ro, rl) = got, want
    fin = torch.isfinite(rl)
    tol = TOL[dtype]
    o_err = (o.float() - ro.float()).abs()
    o_bad = (o_err > tol["atol"] + tol["rtol"] * ro.float().abs()).sum().item()
    return dict(
        out_err=o_err.max().item() if o_err.numel() else 0.0,
        out_bad=o_bad,
        lse_err=(l[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0,
        neginf_equal=bool(torch.equal(torch.isneginf(l), torch.isneginf(rl))),
        finite=bool(torch.isfinite(o).all()),
        shapes=[list(o.shape), list(l.shape), str(o.dtype), str(l.dtype)] == [list(ro.shape), list(rl.shape), str(ro.dtype), str(rl.dtype)],
    )


def check(res, dtype, name):
    tol = TOL[dtype]
    assert res["shapes"], f"{name}: output shapes/dtypes differ from the reference"
    assert res["out_bad"] == 0, f"{name}: {res['out_bad']} out elements beyond tolerance, max error {res['out_err']:.3g}"
    assert res["lse_err"] <= tol["lse"], f"{name}: lse max error {res['lse_err']:.3g} > {tol['lse']}"
    assert res["neginf_equal"], f"{name}: lse = -inf rows differ from the reference"
    assert res["finite"], f"{name}: non-finite output"


if __name__ != "__main__":
    import mplus_fast.ops  # noqa: F401
    from mplus_fast.ops.attention import memory_attention_reference, merge_attention_states_reference
    from mplus_fast.ops.testing import needs_native

    ATT = torch.ops.mplus_fast.memory_attention
    MERGE = torch.ops.mplus_fast.merge_attention_states
    native_cpu = needs_native("memory_attention")
    IMPLS = [pytest.param("native", marks=native_cpu), "reference"]
    cuda_native = [pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"), needs_native("memory_attention", "cuda")]

    def att_of(impl):
        return ATT if impl == "native" else memory_attention_reference

    @native_cpu
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("name", list(CASES))
    def test_parity_cpu(name, dtype):
        args = make_inputs(**CASES[name], dtype=dtype)
        check(compare(ATT(*args), memory_attention_reference(*args), dtype), dtype, name)

    @native_cpu
    def test_native_cpu_kernels_are_registered():
        for op in ("memory_attention", "merge_attention_states"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mplus_fast::{op}", "CPU")

    def test_reference_mask_is_bottom_right():
        """The truth itself: query i of n sees all P prefix rows and tail keys 0..i (SDPA lower-right)."""
        from torch.nn.attention.bias import causal_lower_right
        q, kp, vp, _, _, _, kt, vt, _, scale = make_inputs(B=1, Hq=2, Hkv=2, n=5, P_src=9)
        k, v = torch.cat((kp, kt), 2), torch.cat((vp, vt), 2)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 14), scale=scale)
        torch.testing.assert_close(memory_attention_reference(q, kp, vp, None, None, None, kt, vt, None, scale)[0], want)

    @pytest.mark.parametrize("impl", IMPLS)
    def test_merge_prefix_and_tail_equals_full(impl):
        att = ATT if impl == "native" else memory_attention_reference
        merge = MERGE if impl == "native" else merge_attention_states_reference
        q, kp, vp, idx, pos, freq, kt, vt, tmask, scale = make_inputs(n=9, index=True, rope=True, mask=True, P=17)
        B, _, n, D = q.shape
        none_tail = torch.zeros(B, n, dtype=torch.bool)  # prefix only: every tail key masked
        empty = kp[:, :, :0]  # tail only: no prefix rows
        a = att(q, kp, vp, idx, pos, freq, kt, vt, none_tail, scale)
        b = att(q, empty, empty, None, None, None, kt, vt, tmask, scale)
        out, lse = merge(a[0], a[1], b[0], b[1])
        full = memory_attention_reference(q, kp, vp, idx, pos, freq, kt, vt, tmask, scale)
        torch.testing.assert_close(out, full[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, full[1], atol=5e-6, rtol=1e-6)

    @needs_native("merge_attention_states")
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_merge_parity_and_empty_parts(dtype):
        g = torch.Generator().manual_seed(1)
        oa, ob = torch.randn(2, 3, 5, 8, generator=g).to(dtype), torch.randn(2, 3, 5, 8, generator=g).to(dtype)
        la, lb = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
        la[0, 0, :2] = float("-inf")  # empty part a
        lb[0, 0, 1:3] = float("-inf")  # empty part b; row 1 empty on both sides
        out, lse = MERGE(oa, la, ob, lb)
        ro, rl = merge_attention_states_reference(oa, la, ob, lb)
        assert torch.isfinite(out).all() and out[0, 0, 1].abs().max() == 0 and torch.isneginf(lse[0, 0, 1])
        torch.testing.assert_close(out, ro, atol=TOL[dtype]["atol"], rtol=TOL[dtype]["rtol"])
        torch.testing.assert_close(lse, rl, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[0, 0, 0], ob[0, 0, 0])  # a empty: b passes through

    @pytest.mark.parametrize("impl", IMPLS)
    def test_padding_queries_are_finite(impl):
        args = list(make_inputs(B=2, n=6, P_src=0))
        args[8] = torch.tensor([[False] * 3 + [True] * 3, [True] * 6])  # left padding, P = 0
        out, lse = att_of(impl)(*args)
        assert torch.isfinite(out).all()
        assert torch.isneginf(lse[0, :, :3]).all() and torch.isfinite(lse[0, :, 3:]).all()
        assert (out[0, :, :3] == 0).all()

    @native_cpu
    @pytest.mark.parametrize("dims", [dict(B=0), dict(n=0), dict(P_src=0)], ids=str)
    def test_empty(dims):
        args = make_inputs(**dims)
        out, lse = ATT(*args)
        ro, rl = memory_attention_reference(*args)
        assert out.shape == ro.shape and lse.shape == rl.shape

    def test_opcheck():
        torch.library.opcheck(ATT.default, make_inputs(index=True, rope=True, mask=True, P=5, dtype=torch.bfloat16))
        torch.library.opcheck(ATT.default, make_inputs(shared=True, noncontig=True))
        o, l = ATT(*make_inputs())
        torch.library.opcheck(MERGE.default, (o, l, o * 2, l - 1))

    @pytest.mark.parametrize("change, match", [
        (dict(kt=torch.randn(2, 3, 7, 16)), r"k_tail must be .*\[2, 3, 7, 16\]|k_tail must be .*\(2, 3, 7, 16\)"),
        (dict(vp=torch.randn(2, 2, 10, 16)), "v_prefix must have k_prefix's shape"),
        (dict(idx=torch.full((2, 11), 11)), r"prefix_index .*outside \[0, 11\)"),
        (dict(idx=torch.zeros(2, 11, dtype=torch.int32)), "prefix_index must be int64"),
        (dict(pos=torch.zeros(10, dtype=torch.int64)), r"prefix_positions must be int64 of shape \(11,\)"),
        (dict(freq=None), "prefix_positions and inv_freq go together"),
        (dict(tmask=torch.ones(2, 6, dtype=torch.bool)), r"tail_mask must be bool of shape \(2, 7\)"),
        (dict(q=torch.randn(2, 4, 7, 16, dtype=torch.float64)), "q must be"),
    ])
    @pytest.mark.parametrize("impl", IMPLS)
    def test_bad_arguments(impl, change, match):
        names = ["q", "kp", "vp", "idx", "pos", "freq", "kt", "vt", "tmask", "scale"]
        args = dict(zip(names, make_inputs(rope=True)))
        args.update(change)
        with pytest.raises((RuntimeError, ValueError), match=match):
            att_of(impl)(*args.values())

    def test_triton_interpreter():
        """The Triton kernels on CPU under TRITON_INTERPRET=1 (float32, tiny shapes), in a subprocess."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, __file__, "--interpret-cases"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(results) == set(INTERPRET_CASES) | {"merge", "merge-vs-full"}
        for name in INTERPRET_CASES:
            check(results[name], torch.float32, f"triton[{name}]")
        assert results["merge"] <= 1e-6 and results["merge-vs-full"] <= 2e-6, results

    @pytest.mark.slow
    def test_triton_compiles_for_sm90():
        """Ahead-of-time compile of the GPU kernels for Hopper (sm_90, down to cubin with triton's
        ptxas), no GPU needed: catches what the interpreter cannot (typing, layouts, shared memory)."""
        triton = pytest.importorskip("triton")
        from triton.backends import backends
        if "nvidia" not in backends or os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("triton's nvidia backend is not available")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mplus_fast.ops.triton import attention as kernels

        fn = kernels._memory_attention_fwd
        consts = dict(GROUP=4, D=128, HALF=64, BLOCK_H=64, BLOCK_M=64, BLOCK_N=64, HAS_INDEX=True, HAS_ROPE=True,
                      HAS_TMASK=True, IEEE=False, LIBDEVICE=True)
        ptr = {"Q": "*bf16", "KP": "*bf16", "VP": "*bf16", "KT": "*bf16", "VT": "*bf16", "OUT": "*bf16",
               "IDX": "*i64", "POS": "*i64", "FREQ": "*fp32", "LSE": "*fp32", "TMASK": "*u8", "qk_scale": "fp32"}
        sig = {n: "constexpr" if n in consts else ptr.get(n, "i64" if n.startswith("s") else "i32") for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        assert compiled.metadata.shared <= 227 * 1024
        msig = {"OA": "*bf16", "LA": "*fp32", "OB": "*bf16", "LB": "*fp32", "OUT": "*bf16", "LSE": "*fp32", "D": "i32",
                "BLOCK_D": "constexpr"}
        triton.compile(ASTSource(fn=kernels._merge_fwd, signature=msig, constexprs={(7,): 128}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
    @pytest.mark.parametrize("name", list(CASES))
    @cuda_native[0]
    @cuda_native[1]
    def test_parity_cuda(name, dtype):
        args = make_inputs(**CASES[name], dtype=dtype, device="cuda")
        check(compare(ATT(*args), memory_attention_reference(*args), dtype), dtype, f"cuda[{name}]")

    @cuda_native[0]
    @needs_native("merge_attention_states", "cuda")
    def test_merge_cuda():
        o, l = ATT(*make_inputs(device="cuda", dtype=torch.bfloat16))
        got = MERGE(o, l, o.flip(2), l.flip(2))
        want = merge_attention_states_reference(o, l, o.flip(2), l.flip(2))
        torch.testing.assert_close(got[0], want[0], atol=1e-2, rtol=2 ** -6)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


def _interpret_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from mplus_fast.ops.attention import memory_attention_reference, merge_attention_states_reference
    from mplus_fast.ops.triton.attention import memory_attention_triton, merge_attention_states_triton

    results = {}
    for name in INTERPRET_CASES:
        args = make_inputs(**CASES[name])
        results[name] = compare(memory_attention_triton(*args), memory_attention_reference(*args), torch.float32)
    q, kp, vp, idx, pos, freq, kt, vt, tmask, scale = make_inputs(index=True, rope=True, mask=True, P=13)
    a = memory_attention_triton(q, kp, vp, idx, pos, freq, kt, vt, torch.zeros_like(tmask), scale)
    b = memory_attention_triton(q, kp[:, :, :0], vp[:, :, :0], None, None, None, kt, vt, tmask, scale)
    merged = merge_attention_states_triton(a[0], a[1], b[0], b[1])
    ref = merge_attention_states_reference(a[0], a[1], b[0], b[1])
    full = memory_attention_reference(q, kp, vp, idx, pos, freq, kt, vt, tmask, scale)
    results["merge"] = (merged[0] - ref[0]).abs().max().item()
    results["merge-vs-full"] = (merged[0] - full[0]).abs().max().item()
    return results


if __name__ == "__main__" and "--interpret-cases" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    print(json.dumps(_interpret_cases()))

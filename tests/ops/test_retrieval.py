"""retrieval_topk: the native kernels against the reference (float32 by a float64 truth, bf16/fp16
by the SPEC §10 rounding, ties included), the authors' bf16 fixture, SPEC §3 special cases,
opcheck, argument errors.

float32: the chosen set must be a valid top-k of a float64 truth (no unchosen key better beyond
the tolerance) and the returned scores must match it. bf16/fp16: scores are rounded values, so
parity is exact: on "dyadic" inputs (few mantissa bits: every float32 sum is exact, in any
order) the native scores and indices equal the reference's bit for bit, exact ties at the cut
included; on random inputs a float32 GEMM summed in another order may move a product across a
rounding boundary, so a score may differ by one ulp of the dtype (measured: none), and the
indices must then be exactly the top-k of the kernel's own scores. `k = M + E` over [keys; extra]
as one block returns every score in index order, which is how full score vectors are compared.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mplus_fast
import mplus_fast.ops  # noqa: F401  (defines the ops, loads the native library)
from mplus_fast import layers as F_
from mplus_fast.ops.retrieval import retrieval_scores_reference, retrieval_topk_reference
from mplus_fast.ops.testing import needs_native
from mplus_fast.ops.topk import topk_ascending_reference
from mplus_fast.retrieval import retrieval_scores

op = torch.ops.mplus_fast.retrieval_topk
ERR = (RuntimeError, ValueError)  # native TORCH_CHECK / reference
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = [torch.bfloat16, torch.float16]
# float32 score tolerance against the float64 truth: summation order and the GPU's exp differ
# (s <= 256 terms of magnitude <= ~10).
TOL32 = 2e-5


def native_devices():
    return [pytest.param(d, marks=needs_native("retrieval_topk", d)) for d in DEVICES]


IMPLS = [pytest.param("native", marks=needs_native("retrieval_topk")), "reference"]


def impl_fn(impl):
    return op if impl == "native" else retrieval_topk_reference


def truth_scores(q, keys, extra, mask):
    allk = keys if extra is None else torch.cat([keys, extra])
    sig = torch.sigmoid(q.double().cpu() @ allk.double().cpu().T)
    w = torch.ones(q.shape[:2], dtype=torch.float64) if mask is None else mask.cpu().double()
    return (sig * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def check_topk_f32(idx, sc, truth, k):
    idx, sc = idx.cpu(), sc.cpu()
    assert idx.dtype == torch.int64 and sc.dtype == torch.float32
    assert idx.shape == (truth.shape[0], k) and sc.shape == idx.shape
    if k == 0:
        return
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly ascending"
    err = (sc.double() - truth.gather(1, idx)).abs()
    assert err.max() <= TOL32, f"scores: max err {err.max():.3g} at {divmod(int(err.argmax()), k)}"
    kth = truth.topk(k, dim=1).values[:, -1:]
    worst = truth.gather(1, idx).min(dim=1, keepdim=True).values
    assert bool((worst >= kth - TOL32).all()), f"not a top-k set: chosen min {worst.min():.6g} < k-th {kth.min():.6g}"


def make(B, n, M, E, s, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, n, s, generator=g) / s**0.5 * 2).to(dtype).to(device)
    keys = torch.randn(M, s, generator=g).to(dtype).to(device)
    extra = torch.randn(E, s, generator=g).to(dtype).to(device) if E >= 0 else None
    return q, keys, extra


def dyadic(shape, g, distinct_rows=None):
    """Values in {-4..4}/8: products are multiples of 1/64, so every float32 sum of them is exact
    in any order, and identical rows score identically (exact ties). `distinct_rows`: draw the
    rows from that many distinct ones (heavy ties)."""
    if distinct_rows is None:
        return torch.randint(-4, 5, shape, generator=g) / 8
    pool = torch.randint(-4, 5, (distinct_rows, *shape[1:]), generator=g) / 8
    return pool[torch.randint(0, distinct_rows, (shape[0],), generator=g)]


def all_scores(fn, q, keys, extra=None, mask=None):
    """Every score, in index order: the top-(M+E) of [keys; extra] as one block (with k > M the op
    would take the SPEC §3 cyclic path; the split does not change any score)."""
    allk = keys if extra is None or extra.shape[0] == 0 else torch.cat([keys, extra])
    idx, sc = fn(q, allk, None, allk.shape[0], mask)
    assert torch.equal(idx.cpu(), torch.arange(allk.shape[0]).expand_as(idx.cpu()))
    return sc.cpu()


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of dtype at |x| (normal range)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(e - mant)


# ---- float32: parity with the float64 truth --------------------------------------------------------
SHAPES = [(1, 1, 1, -1, 1, 1), (2, 7, 83, 5, 37, 7), (1, 83, 989, 0, 64, 83), (3, 989, 200, 40, 33, 170),
          (1, 7, 5000, 3, 17, 2500), (2, 1, 83, -1, 256, 83)]


@pytest.mark.parametrize("device", native_devices())
@pytest.mark.parametrize("B,n,M,E,s,k", SHAPES)
def test_float32_parity(device, B, n, M, E, s, k):
    q, keys, extra = make(B, n, M, E, s, torch.float32, device)
    truth = truth_scores(q, keys, extra, None)
    check_topk_f32(*op(q, keys, extra, k), truth, k)


def test_float32_reference_meets_the_truth():
    q, keys, extra = make(2, 7, 83, 5, 37, torch.float32, "cpu")
    check_topk_f32(*retrieval_topk_reference(q, keys, extra, 7), truth_scores(q, keys, extra, None), 7)


# ---- bf16 / fp16: SPEC §10 rounding ----------------------------------------------------------------
@pytest.mark.parametrize("device", native_devices())
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,n,M,E,s", [(1, 1, 1, 0, 1), (2, 7, 83, 5, 37), (1, 83, 989, 0, 64), (3, 130, 200, 40, 33),
                                       (1, 70, 700, 9, 256), (2, 1, 83, 0, 264)])
def test_low_precision_dyadic_inputs_are_bit_exact(device, dtype, B, n, M, E, s):
    """Exact float32 sums: native scores and indices equal the reference's, for every k, with the
    keys drawn from 6 distinct rows so that exact ties straddle every cut."""
    g = torch.Generator().manual_seed(M + s)
    q = dyadic((B, n, s), g).to(dtype).to(device)
    keys = dyadic((M, s), g, distinct_rows=6).to(dtype).to(device)
    extra = dyadic((E, s), g, distinct_rows=3).to(dtype).to(device)
    want = all_scores(retrieval_topk_reference, q, keys, extra)
    got = all_scores(op, q, keys, extra)
    assert torch.equal(got, want), f"{int((got != want).sum())} scores differ, max {(got - want).abs().max():.3g}"
    for k in sorted({1, 2, M // 3, M // 2, M, M + E}):
        if k <= M:
            idx, sc = op(q, keys, extra, k)
            ridx, rsc = retrieval_topk_reference(q, keys, extra, k)
            assert torch.equal(idx.cpu(), ridx.cpu()), f"k={k}: indices differ"
            assert torch.equal(sc.cpu(), rsc.cpu()), f"k={k}: scores differ"


@pytest.mark.parametrize("device", native_devices())
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,n,M,E,s,k", SHAPES)
def test_low_precision_random_inputs(device, dtype, B, n, M, E, s, k):
    q, keys, extra = make(B, n, M, E, s, dtype, device)
    want = all_scores(retrieval_topk_reference, q, keys, extra)
    got = all_scores(op, q, keys, extra)
    diff = (got - want).abs()
    assert bool((diff <= ulp(want, dtype)).all()), f"a score differs by more than one {dtype} ulp: max {diff.max():.3g}"
    assert (diff > 0).float().mean() <= 1e-3, f"{int((diff > 0).sum())} of {diff.numel()} scores differ by an ulp"
    idx, sc = op(q, keys, extra, k)
    own_idx, own_sc = topk_ascending_reference(got, k)  # the top-k of the kernel's own scores
    assert torch.equal(idx.cpu(), own_idx) and torch.equal(sc.cpu(), own_sc)
    if torch.equal(got, want):
        assert torch.equal(idx.cpu(), retrieval_topk_reference(q, keys, extra, k)[0].cpu())


@pytest.mark.parametrize("device", native_devices())
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_sigmoid_of_every_value(device, dtype):
    """One query [1], one key per finite value x of the dtype: score = sigmoid(x) rounded as torch
    rounds it in that dtype, for all 2^16 bit patterns."""
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    got = all_scores(op, torch.ones(1, 1, 1, dtype=dtype, device=device), x[:, None].to(device))
    want = torch.sigmoid(x.to(device)).float().cpu()  # torch's own sigmoid in the dtype, on that device
    bad = got != want
    assert not bad.any(), f"{int(bad.sum())} values, e.g. x={x[bad][:4].tolist()}: {got[bad][:4]} vs {want[bad][:4]}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_rounds_where_spec_says(impl, dtype):
    """The products' float32 sum is rounded ONCE (not each product), and the mean's float32 sum
    is rounded once after the division (not the sum first): cases where the other choice differs."""
    fn = impl_fn(impl)
    eps = torch.finfo(dtype).eps
    # q . key = -8 - 4 eps - 4 eps (4 eps: half an ulp at 8): rounded once, -8 - 8 eps; summed in
    # the dtype, each half-ulp step ties to even and it stays -8. Far from 0, sigmoid ~ e^x keeps
    # the difference.
    q = torch.ones(1, 1, 3, dtype=dtype)
    key = torch.tensor([[-8.0, -4 * eps, -4 * eps]], dtype=dtype)
    once = torch.sigmoid(torch.tensor([-8 - 8 * eps], dtype=torch.float32).to(dtype)).float()
    assert once != torch.sigmoid(torch.tensor([-8.0], dtype=dtype)).float()  # the case discriminates
    assert torch.equal(all_scores(fn, q, key), once[None])
    # the mean of sigmoid values over 3 queries: dtype(float32 sum / 3), not dtype(dtype(sum) / 3)
    for x in torch.linspace(0.05, 3.0, 60).tolist():
        q3 = torch.tensor([[[x], [x], [3.0]]], dtype=dtype)
        sig = torch.sigmoid(q3[0, :, 0]).float()
        mean_once = (sig.sum() / 3).to(dtype).float()
        if mean_once != (sig.sum().to(dtype).float() / 3).to(dtype).float():
            break
    else:
        raise AssertionError("no discriminating case found")
    assert torch.equal(all_scores(fn, q3, torch.ones(1, 1, dtype=dtype)), mean_once[None, None])


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_reference_backend_scoring_follows_spec10(dtype):
    """mplus_fast.retrieval (the reference backend's scoring: torch's own `.mean` in the dtype)
    equals the op's reference, i.e. torch sums the mean in float32 and rounds once on this device
    (summing then dividing in the dtype would differ in thousands of these scores)."""
    q, keys, _ = make(1, 97, 3000, -1, 64, dtype, "cpu", seed=5)
    ours = retrieval_scores(q[0], keys).float()
    assert torch.equal(ours, retrieval_scores_reference(q, keys)[0])
    sig = torch.sigmoid(q[0] @ keys.T)
    twice = (sig.float().sum(0).to(dtype).float() / 97).to(dtype).float()
    assert (twice != ours).sum() > 100


@pytest.mark.parametrize("device", native_devices())
def test_low_precision_masked_mean(device):
    g = torch.Generator().manual_seed(3)
    q = dyadic((3, 40, 48), g).to(torch.bfloat16).to(device)
    keys = dyadic((300, 48), g, distinct_rows=5).to(torch.bfloat16).to(device)
    mask = (torch.rand(3, 40, generator=g) > 0.4).to(device)
    mask[2] = False  # no query: scores 0
    got, want = all_scores(op, q, keys, None, mask), all_scores(retrieval_topk_reference, q, keys, None, mask)
    assert torch.equal(got, want) and bool((got[2] == 0).all())
    # the masked-out queries do not matter
    assert torch.equal(all_scores(op, q[:1, mask[0]], keys), got[:1])


# ---- the authors' code in bf16 (tests/fixtures/upstream_tiny_bf16) ----------------------------------
BF16 = "upstream_tiny_bf16"


@pytest.fixture(scope="module")
def bf16_fixture(fixtures_dir):
    root = fixtures_dir / BF16
    return {"tiny": fixtures_dir / "upstream_tiny" / "ckpt", "tiny+3": root / "ckpt_after3"}, \
        load_file(str(root / "expected.safetensors"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("state", ["tiny", "tiny+3"])
def test_upstream_bf16_fixture_layer0(bf16_fixture, impl, state):
    """Layer 0's queries are query_proj(input_layernorm(token embeddings)), rebuilt from the
    checkpoint in bf16 as the reference backend does: the scores over [LTM; pending] equal the
    authors' `can.scores` bit for bit and the retrieved set equals `can.set` (ties at the R-th
    place are pinned to the lower index), for all 6 prompts."""
    ckpts, e = bf16_fixture
    model = mplus_fast.load(ckpts[state], dtype=torch.bfloat16, backend="reference")
    c, st, layer = model.config, model.state, model.weights.layers[0]
    keys = torch.cat([st.ltm_keys[0], st.pend_keys[0]]).to(torch.bfloat16)
    n_ltm, R = st.ltm_keys[0].shape[0], c.ltm_retrieved
    fn = impl_fn(impl)
    ties = 0
    for p in range(6):
        x = model.weights.embed[e[f"{state}.query.{p}"][0]]
        q = F_.selector(layer.selectors["query_proj"], F_.rms_norm(x, layer.input_norm, c.rms_norm_eps), c.hidden_act)
        want = e[f"{state}.can.scores.{p}.0"]
        got = all_scores(fn, q[None], keys[:n_ltm], keys[n_ltm:])[0]
        assert torch.equal(got, want), f"prompt {p}: scores differ at {(got != want).nonzero().flatten().tolist()}"
        idx, _ = fn(q[None], keys[:n_ltm], keys[n_ltm:], R)
        assert idx[0].tolist() == e[f"{state}.can.set.{p}.0"].tolist(), f"prompt {p}"
        srt = want.sort(descending=True).values
        ties += int(srt[R - 1] == srt[R])
    assert ties >= 3, "the fixture's prompts should put exact ties at the cut"


# ---- SPEC §3 special cases, ties, errors ------------------------------------------------------------
@pytest.mark.parametrize("device", native_devices())
def test_mask_non_contiguous_and_empty_rows(device):
    q, keys, extra = make(3, 40, 300, 20, 48, torch.float32, device, seed=1)
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[2] = False  # a row with no query at all: scores 0, indices 0..k-1
    mask = mask.to(device)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    kt = keys.T.contiguous().T
    idx, sc = op(qt, kt, extra[::2], 9, mask)
    check_topk_f32(idx, sc, truth_scores(q, keys, extra[::2], mask), 9)
    assert idx[2].tolist() == list(range(9)) and bool((sc[2] == 0).all())
    idx0, sc0 = op(q[:1, mask[0]], keys, extra[::2], 9)  # masked-out queries do not matter
    assert idx0[0].tolist() == idx[0].tolist()
    torch.testing.assert_close(sc0[0], sc[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_go_to_lower_index(impl, dtype):
    fn = impl_fn(impl)
    keys = torch.zeros(10, 4)
    keys[[3, 4, 6, 8]] = torch.tensor([1.0, 0, 0, 0])  # four keys with exactly the same score
    keys[1] = torch.tensor([2.0, 0, 0, 0])  # the best
    q = torch.ones(1, 3, 4, dtype=dtype)
    idx, _ = fn(q, keys.to(dtype), None, 3)
    assert idx.tolist() == [[1, 3, 4]]
    idx, _ = fn(q, torch.zeros(6, 4, dtype=dtype), torch.zeros(4, 4, dtype=dtype), 6)
    assert idx.tolist() == [[0, 1, 2, 3, 4, 5]]  # all tied: the LTM rows (lower indices) win over the extra block


@pytest.mark.parametrize("device", native_devices())
@pytest.mark.parametrize("ranks", [1, 3, 7])
def test_large_tied_rows_under_several_team_sizes(device, ranks, monkeypatch):
    """A row selected by a team of ranks (csrc/ops/topk.cpp, MPLUS_FAST_TOPK_RANKS: the GPU
    block's code on an OpenMP team), with tens of thousands of exact ties at the cut: the same
    answer for every team size."""
    monkeypatch.setenv("MPLUS_FAST_TOPK_RANKS", str(ranks))
    g = torch.Generator().manual_seed(ranks)
    q = dyadic((1, 5, 16), g).to(torch.bfloat16).to(device)
    keys = dyadic((60_000, 16), g, distinct_rows=4).to(torch.bfloat16).to(device)
    idx, sc = op(q, keys, None, 25_000)
    ridx, rsc = retrieval_topk_reference(q, keys, None, 25_000)
    assert torch.equal(idx.cpu(), ridx.cpu()) and torch.equal(sc.cpu(), rsc.cpu())


@pytest.mark.parametrize("impl", IMPLS)
def test_extra_block_is_indexed_after_keys(impl):
    q, keys, _ = make(1, 5, 20, -1, 8, torch.float32, "cpu")
    extra = (q[0].mean(0, keepdim=True) * 50).repeat(2, 1)  # far better than any key
    idx, _ = impl_fn(impl)(q, keys, extra, 2)
    assert idx.tolist() == [[20, 21]]


@pytest.mark.parametrize("impl", IMPLS)
def test_fewer_keys_than_k_spec3(impl):
    fn = impl_fn(impl)
    q, keys, extra = make(2, 4, 3, 6, 8, torch.float32, "cpu")
    idx, sc = fn(q, keys, extra, 7)
    assert idx.tolist() == [[2, 0, 1, 2, 0, 1, 2]] * 2  # extra block ignored, this exact order
    assert sc.dtype == torch.float32 and bool((sc == 0).all())
    assert fn(q, keys, None, 4)[0].tolist() == [[2, 0, 1, 2]] * 2
    assert fn(q, keys[:1], None, 3)[0].tolist() == [[0, 0, 0]] * 2


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_inputs(impl):
    fn = impl_fn(impl)
    q, keys, extra = make(2, 0, 9, 0, 8, torch.float32, "cpu")  # n = 0 queries, empty extra block
    idx, sc = fn(q, keys, extra, 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2 and bool((sc == 0).all())
    idx, sc = fn(q, keys, extra, 0)
    assert idx.shape == (2, 0) and sc.shape == (2, 0)
    idx, sc = fn(q[:0], keys, extra, 3)
    assert idx.shape == (0, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl):
    fn = impl_fn(impl)
    q, keys, extra = make(2, 4, 9, 2, 8, torch.float32, "cpu")
    with pytest.raises(ERR, match=r"keys is empty \(shape .0, 8"):
        fn(q, keys[:0], extra, 3)
    with pytest.raises(ERR, match=r"keys must be .*got .9, 5"):
        fn(q, keys[:, :5], extra, 3)
    with pytest.raises(ERR, match=r"extra_keys must be .*got .2, 8. .*(Half|float16)"):
        fn(q, keys, extra.half(), 3)
    with pytest.raises(ERR, match=r"query_mask must be .*got .2, 3"):
        fn(q, keys, extra, 3, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ERR, match=r"queries must be .*got .4, 8"):
        fn(q[0], keys, extra, 3)
    with pytest.raises(ERR, match=r"k=-1"):
        fn(q, keys, extra, -1)


@pytest.mark.parametrize("device", native_devices())
def test_opcheck(device):
    q, keys, extra = make(2, 7, 50, 3, 16, torch.float32, device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    qb, kb, eb = q.bfloat16(), keys.bfloat16(), extra.bfloat16()
    for args in [(q, keys, extra, 5, mask), (q, keys, None, 5, None), (q, keys[:3], extra, 5, None),
                 (qb, kb, eb, 5, mask)]:
        torch.library.opcheck(op, args)


def test_public_wrapper_impl_choice():
    from mplus_fast.ops.retrieval import retrieval_topk

    q, keys, extra = make(1, 3, 20, 2, 8, torch.float32, "cpu")
    assert torch.equal(retrieval_topk(q, keys, extra, 4)[0], op(q, keys, extra, 4)[0])
    with pytest.raises(ValueError, match="impl must be"):
        retrieval_topk(q, keys, extra, 4, impl="bogus")

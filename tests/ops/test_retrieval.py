"""retrieval_topk: parity with the reference, SPEC §3 special cases, opcheck, argument errors.

Index parity is checked against a float64 truth computed from the same (rounded) inputs: the
chosen set must be a valid top-k (no unchosen key scores better than a chosen one beyond the
tolerance), and returned scores must match the truth at the chosen indices. Exact index equality
is asserted where scores are exactly tied or well separated.
"""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401  (defines the ops, loads the native library)
from mplus_fast.ops.retrieval import retrieval_topk_reference

op = torch.ops.mplus_fast.retrieval_topk
ERR = (RuntimeError, ValueError)  # native TORCH_CHECK / reference
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Score tolerance per dtype. Every implementation converts inputs to float32 before the GEMM and
# accumulates in float32, so the input dtype does not widen the error: only summation order and
# the GPU's fast exp differ (s <= 256 terms of magnitude <= ~10).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def truth_scores(q, keys, extra, mask):
    allk = keys if extra is None else torch.cat([keys, extra])
    sig = torch.sigmoid(q.double().cpu() @ allk.double().cpu().T)
    w = torch.ones(q.shape[:2], dtype=torch.float64) if mask is None else mask.cpu().double()
    return (sig * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def check_topk(idx, sc, truth, k, tol):
    idx, sc = idx.cpu(), sc.cpu()
    assert idx.dtype == torch.int64 and sc.dtype == torch.float32
    assert idx.shape == (truth.shape[0], k) and sc.shape == idx.shape
    if k == 0:
        return
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly ascending"
    err = (sc.double() - truth.gather(1, idx)).abs()
    assert err.max() <= tol, f"scores: max err {err.max():.3g} at {divmod(int(err.argmax()), k)}"
    kth = truth.topk(k, dim=1).values[:, -1:]
    worst = truth.gather(1, idx).min(dim=1, keepdim=True).values
    assert bool((worst >= kth - tol).all()), f"not a top-k set: chosen min {worst.min():.6g} < k-th {kth.min():.6g}"


def make(B, n, M, E, s, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, n, s, generator=g) / s**0.5 * 2).to(dtype).to(device)
    keys = torch.randn(M, s, generator=g).to(dtype).to(device)
    extra = torch.randn(E, s, generator=g).to(dtype).to(device) if E >= 0 else None
    return q, keys, extra


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,n,M,E,s,k",
    [(1, 1, 1, -1, 1, 1), (2, 7, 83, 5, 37, 7), (1, 83, 989, 0, 64, 83), (3, 989, 200, 40, 33, 170),
     (1, 7, 5000, 3, 17, 2500), (2, 1, 83, -1, 256, 83)],
)
def test_parity(device, dtype, B, n, M, E, s, k):
    q, keys, extra = make(B, n, M, E, s, dtype, device)
    idx, sc = op(q, keys, extra, k)
    truth = truth_scores(q, keys, extra, None)
    check_topk(idx, sc, truth, k, TOL[dtype])
    ridx, rsc = retrieval_topk_reference(q, keys, extra, k)
    check_topk(ridx, rsc, truth, k, TOL[dtype])  # the reference passes the same bar


@pytest.mark.parametrize("device", DEVICES)
def test_mask_non_contiguous_and_empty_rows(device):
    q, keys, extra = make(3, 40, 300, 20, 48, torch.float32, device, seed=1)
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[2] = False  # a row with no query at all: scores 0, indices 0..k-1
    mask = mask.to(device)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    kt = keys.T.contiguous().T
    idx, sc = op(qt, kt, extra[::2], 9, mask)
    truth = truth_scores(q, keys, extra[::2], mask)
    check_topk(idx, sc, truth, 9, TOL[torch.float32])
    assert idx[2].tolist() == list(range(9)) and bool((sc[2] == 0).all())
    # masked-out queries do not matter: same answer with only the kept queries of row 0
    idx0, sc0 = op(q[:1, mask[0]], keys, extra[::2], 9)
    assert idx0[0].tolist() == idx[0].tolist()
    torch.testing.assert_close(sc0[0], sc[0], atol=2e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_lower_index(device):
    keys = torch.zeros(10, 4)
    keys[[3, 4, 6, 8]] = torch.tensor([1.0, 0, 0, 0])  # four keys with exactly the same score
    keys[1] = torch.tensor([2.0, 0, 0, 0])  # the best
    q = torch.ones(1, 3, 4)
    idx, sc = op(q.to(device), keys.to(device), None, 3)
    assert idx.tolist() == [[1, 3, 4]]
    idx, _ = op(q.to(device), torch.zeros(6, 4, device=device), torch.zeros(4, 4, device=device), 6)
    assert idx.tolist() == [[0, 1, 2, 3, 4, 5]]  # all tied: the LTM rows (lower indices) win over the extra block


@pytest.mark.parametrize("device", DEVICES)
def test_extra_block_is_indexed_after_keys(device):
    q, keys, _ = make(1, 5, 20, -1, 8, torch.float32, device)
    extra = (q[0].mean(0, keepdim=True) * 50).repeat(2, 1)  # far better than any key
    idx, _ = op(q, keys, extra, 2)
    assert idx.tolist() == [[20, 21]]


@pytest.mark.parametrize("device", DEVICES)
def test_fewer_keys_than_k_spec3(device):
    q, keys, extra = make(2, 4, 3, 6, 8, torch.float32, device)
    idx, sc = op(q, keys, extra, 7)
    assert idx.tolist() == [[2, 0, 1, 2, 0, 1, 2]] * 2  # extra block ignored, this exact order
    assert sc.dtype == torch.float32 and bool((sc == 0).all())
    assert op(q, keys, None, 4)[0].tolist() == [[2, 0, 1, 2]] * 2
    assert op(q, keys[:1], None, 3)[0].tolist() == [[0, 0, 0]] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    q, keys, extra = make(2, 0, 9, 0, 8, torch.float32, device)  # n = 0 queries, empty extra block
    idx, sc = op(q, keys, extra, 4)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2 and bool((sc == 0).all())
    idx, sc = op(q, keys, extra, 0)
    assert idx.shape == (2, 0) and sc.shape == (2, 0)
    idx, sc = op(q[:0], keys, extra, 3)
    assert idx.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    q, keys, extra = make(2, 4, 9, 2, 8, torch.float32, device)
    with pytest.raises(ERR, match=r"keys is empty \(shape .0, 8"):
        op(q, keys[:0], extra, 3)
    with pytest.raises(ERR, match=r"keys must be .*got .9, 5"):
        op(q, keys[:, :5], extra, 3)
    with pytest.raises(ERR, match=r"extra_keys must be .*got .2, 8. .*(Half|float16)"):
        op(q, keys, extra.half(), 3)
    with pytest.raises(ERR, match=r"query_mask must be .*got .2, 3"):
        op(q, keys, extra, 3, torch.ones(2, 3, dtype=torch.bool, device=device))
    with pytest.raises(ERR, match=r"queries must be .*got .4, 8"):
        op(q[0], keys, extra, 3)
    with pytest.raises(ERR, match=r"k=-1"):
        op(q, keys, extra, -1)


def test_reference_errors_name_the_argument():
    q, keys, _ = make(1, 2, 4, -1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"keys is empty \(shape \(0, 8\)"):
        retrieval_topk_reference(q, keys[:0], None, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, keys, extra = make(2, 7, 50, 3, 16, torch.float32, device)
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    for args in [(q, keys, extra, 5, mask), (q, keys, None, 5, None), (q, keys[:3], extra, 5, None)]:
        torch.library.opcheck(op, args)


def test_public_wrapper_impl_choice():
    from mplus_fast.ops.retrieval import retrieval_topk

    q, keys, extra = make(1, 3, 20, 2, 8, torch.float32, "cpu")
    assert torch.equal(retrieval_topk(q, keys, extra, 4)[0], op(q, keys, extra, 4)[0])
    with pytest.raises(ValueError, match="impl must be"):
        retrieval_topk(q, keys, extra, 4, impl="bogus")

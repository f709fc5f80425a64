"""topk_ascending: the native selection (csrc/kernels/topk_select.h, the code the CUDA block runs)
against the reference's stable sort, exactly: indices and values, on awkward shapes and on rows
built to be hard (thousands of exact ties at the cut, NaN, +-inf, -0), with OpenMP teams of
several sizes standing in for the CUDA block (MPLUS_FAST_TOPK_RANKS); opcheck; argument errors."""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.testing import needs_native
from mplus_fast.ops.topk import topk_ascending_reference

OP = torch.ops.mplus_fast.topk_ascending
ERR = (RuntimeError, ValueError)
DEVICES = [pytest.param("cpu", marks=needs_native("topk_ascending"))]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", marks=needs_native("topk_ascending", "cuda")))
IMPLS = [pytest.param(OP, marks=needs_native("topk_ascending"), id="native"),
         pytest.param(topk_ascending_reference, id="reference")]


def tied(B, n, levels, g):
    """Scores taking `levels` distinct values: every cut falls inside a run of exact ties."""
    return torch.randint(0, levels, (B, n), generator=g).float() / 7


def assert_same(scores, k, device, what=""):
    idx, val = OP(scores.to(device), k)
    ridx, rval = topk_ascending_reference(scores, k)
    assert idx.dtype == torch.int64 and val.dtype == torch.float32 and idx.shape == (scores.shape[0], k)
    assert torch.equal(idx.cpu(), ridx), f"{what}: indices differ at {(idx.cpu() != ridx).nonzero()[:5].tolist()}"
    assert torch.equal(val.cpu().nan_to_num(-7.0), rval.nan_to_num(-7.0)), f"{what}: values differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,n,k", [(1, 1, 1), (1, 7, 0), (2, 83, 7), (3, 989, 989), (1, 5000, 2500), (4, 3000, 1)])
@pytest.mark.parametrize("kind", ["random", "tied", "few-levels"])
def test_parity(device, B, n, k, kind):
    g = torch.Generator().manual_seed(n + k)
    scores = {"random": lambda: torch.randn(B, n, generator=g),
              "tied": lambda: tied(B, n, 50, g),
              "few-levels": lambda: tied(B, n, 2, g)}[kind]()
    assert_same(scores, k, device, kind)


@pytest.mark.parametrize("device", DEVICES)
def test_special_values(device):
    row = torch.tensor([[0.5, float("nan"), float("-inf"), -0.0, 0.0, float("inf"), -1e-30, 1e-30, float("nan"),
                         -3.0, 0.5, float("-inf")]])
    for k in range(row.shape[1] + 1):  # NaN ranks as -inf (after it by index), -0 == +0
        assert_same(row, k, device, f"k={k}")
    idx, _ = OP(row.to(device), 6)
    assert idx.tolist() == [[0, 3, 4, 5, 7, 10]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ranks", [1, 2, 3, 7, 64])
def test_team_sizes(device, ranks, monkeypatch):
    """Rows selected by a team of ranks (MPLUS_FAST_TOPK_RANKS: on the CPU an OpenMP team runs the
    CUDA block's code, with its barriers, atomics and scans; a rank needs >= 1,024 scores): the
    sequential answer for any team size, on tied and random rows, one row or several."""
    monkeypatch.setenv("MPLUS_FAST_TOPK_RANKS", str(ranks))
    g = torch.Generator().manual_seed(ranks)
    scores = torch.cat([tied(1, 70_000, 3, g), torch.randn(1, 70_000, generator=g)])
    for k in (1, 23_333, 46_667, 70_000):
        assert_same(scores[:1], k, device, f"tied k={k}")
    assert_same(scores[1:], 2560, device, "random")
    assert_same(tied(5, 9_000, 4, g), 4_321, device, "5 rows")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(device):
    g = torch.Generator().manual_seed(1)
    base = tied(50, 6, 9, g)
    assert_same(base.T, 20, device, "transposed")  # (6, 50), stride (1, 6)
    assert OP(torch.empty(0, 5, device=device), 3)[0].shape == (0, 3)
    assert OP(torch.empty(2, 0, device=device), 0)[0].shape == (2, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl):
    with pytest.raises(ERR, match=r"scores must be \(B, n\) float32, got .*5"):
        impl(torch.zeros(5), 1)
    with pytest.raises(ERR, match=r"scores must be \(B, n\) float32, got .*(Double|float64)"):
        impl(torch.zeros(2, 5, dtype=torch.float64), 1)
    with pytest.raises(ERR, match=r"k=6 must be in \[0, n=5\]"):
        impl(torch.zeros(2, 5), 6)
    with pytest.raises(ERR, match=r"k=-1 must be in"):
        impl(torch.zeros(2, 5), -1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(2)
    torch.library.opcheck(OP, (tied(3, 40, 5, g).to(device), 11))
    torch.library.opcheck(OP, (torch.randn(1, 7, generator=g).to(device), 0))

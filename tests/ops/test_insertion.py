"""stm_update_ and assemble_rows: parity with the references (exact: pure data movement, and the
pos-emb add rounds once like the reference), validation before mutation, opcheck."""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.insertion import assemble_rows_reference, drop_and_concat_reference, materialize_stm

stm_update_ = torch.ops.mplus_fast.stm_update_
assemble_rows = torch.ops.mplus_fast.assemble_rows
ERR = (RuntimeError, ValueError)  # native TORCH_CHECK / reference
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand_drop(L, N, T, g):
    return torch.stack([torch.randperm(N, generator=g)[:T] for _ in range(L)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,N,T,d", [(1, 1, 1, 1), (2, 7, 3, 5), (3, 83, 7, 33), (1, 989, 83, 7), (2, 9, 9, 4), (1, 5, 0, 3)])
def test_stm_update_matches_drop_and_concat(device, dtype, L, N, T, d):
    g = torch.Generator().manual_seed(N * 31 + T)
    stm = torch.randn(L, N, d, generator=g).to(dtype).to(device)  # logical order, as the reference keeps it
    pool = stm.clone()
    order = torch.arange(N).repeat(L, 1).to(device)
    for step in range(4):  # a random sequence of updates
        drop = rand_drop(L, N, T, g).to(device)
        new = torch.randn(L, T, d, generator=g).to(dtype).to(device)
        before = pool.clone()
        stm = drop_and_concat_reference(stm, drop, new)
        stm_update_(pool, order, drop, new)
        assert torch.equal(materialize_stm(pool, order), stm), f"step {step}: STM differs"
        changed = (pool != before).any(dim=2).sum(dim=1)
        assert bool((changed <= T).all()), "more than T physical slots were written"
        assert torch.equal(order.sort(dim=1).values, torch.arange(N, device=device).repeat(L, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_stm_update_non_contiguous(device):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 12, 10, generator=g).to(device)
    pool = big[:, :, 1:8]  # strided rows (non-contiguous pool, a view: must be updated in place)
    order = torch.arange(12).repeat(2, 1).to(device)
    stm = pool.clone()
    drop = rand_drop(2, 12, 4, g).to(device)
    new = torch.randn(2, 7, 4, generator=g).to(device).transpose(1, 2)  # non-contiguous (2, 4, 7)
    stm_update_(pool, order, drop, new)
    assert torch.equal(materialize_stm(big[:, :, 1:8], order), drop_and_concat_reference(stm, drop, new))


@pytest.mark.parametrize("device", DEVICES)
def test_stm_update_validates_before_mutating(device):
    pool = torch.randn(2, 6, 3, device=device)
    order = torch.arange(6).repeat(2, 1).to(device)
    new = torch.randn(2, 2, 3, device=device)
    p0, o0 = pool.clone(), order.clone()
    bad = {
        r"drop .2, 2.* outside \[0, 6\)": torch.tensor([[0, 1], [2, 6]]),
        r"drop .2, 2.* duplicate": torch.tensor([[0, 1], [3, 3]]),
        r"drop must be .*got .2, 7": torch.zeros(2, 7, dtype=torch.long),
        r"drop must be .*got .2, 2. .*(Int|int32)": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
    }
    for msg, drop in bad.items():
        with pytest.raises(ERR, match=msg):
            stm_update_(pool, order, drop.to(device), new)
    with pytest.raises(ERR, match=r"new_rows must be .*got .2, 2, 4"):
        stm_update_(pool, order, torch.tensor([[0, 1], [2, 3]], device=device), torch.randn(2, 2, 4, device=device))
    with pytest.raises(ERR, match=r"order must be .*got .2, 5"):
        stm_update_(pool, order[:, :5], torch.tensor([[0, 1], [2, 3]], device=device), new)
    assert torch.equal(pool, p0) and torch.equal(order, o0)


@pytest.mark.parametrize("device", DEVICES)
def test_stm_update_opcheck(device):
    pool = torch.randn(2, 9, 5, device=device)
    order = torch.stack([torch.randperm(9), torch.randperm(9)]).to(device)
    drop = torch.tensor([[8, 0, 4], [1, 2, 3]], device=device)
    torch.library.opcheck(stm_update_, (pool, order, drop, torch.randn(2, 3, 5, device=device)))


def assemble_case(B, M, R, N, m, d, dtype, device, g, with_bank=True, with_order=True, with_new=True, pe_rows=3):
    t = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    bos, stm, pe = t(d), t(N, d), t(d)
    bank = t(M, d) if with_bank else None
    bidx = torch.randint(0, M, (B, R), generator=g).to(device) if with_bank else None
    order = torch.randperm(N, generator=g).to(device) if with_order else None
    new = t(B, m, d) if with_new else None
    rows = 1 + (R if with_bank else 0) + N + (m if with_new else 0)
    return [bos, bank, bidx, stm, order, new, pe if pe_rows else None, min(pe_rows, rows)], (B, rows, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,M,R,N,m,d,flags",
    [(1, 1, 1, 1, 1, 1, (1, 1, 1)), (2, 83, 7, 13, 5, 33, (1, 1, 1)), (3, 989, 83, 7, 0, 9, (1, 0, 1)),
     (1, 20, 4, 0, 7, 6, (1, 1, 1)), (2, 5, 3, 11, 4, 17, (0, 1, 0)), (1, 5, 0, 4, 2, 5, (1, 1, 1))],
)
def test_assemble_rows_parity(device, dtype, B, M, R, N, m, d, flags):
    g = torch.Generator().manual_seed(B * 100 + N)
    for pe_rows in (0, 3, 10**9):
        args, shape = assemble_case(B, M, R, N, m, d, dtype, device, g, *map(bool, flags), pe_rows=pe_rows)
        args[-1] = min(pe_rows, shape[1])
        out = torch.full(shape, float("nan"), dtype=dtype, device=device)
        expect = torch.empty_like(out)
        assemble_rows(*args, out)
        assemble_rows_reference(*args, expect)
        assert torch.equal(out, expect), f"pe_rows={pe_rows}: max err {(out.float() - expect.float()).abs().max()}"


@pytest.mark.parametrize("device", DEVICES)
def test_assemble_rows_non_contiguous(device):
    g = torch.Generator().manual_seed(3)
    args, shape = assemble_case(2, 30, 5, 8, 3, 12, torch.float32, device, g)
    bos, bank, bidx, stm, order, new, pe, pr = args
    bank_nc = torch.stack([bank, bank], -1)[..., 0]  # strided last dim
    stm_nc = torch.stack([stm, stm], 1)[:, 0]  # strided rows
    new_nc = new.transpose(0, 1).contiguous().transpose(0, 1)
    big = torch.zeros(2, shape[1] + 2, 12, device=device)
    out = big[:, 1:-1]  # a view with gaps between batch rows
    assemble_rows(bos, bank_nc, bidx[:, :], stm_nc, order, new_nc, pe, pr, out)
    expect = torch.empty(shape, device=device)
    assemble_rows_reference(bos, bank, bidx, stm, order, new, pe, pr, expect)
    assert torch.equal(big[:, 1:-1], expect) and bool((big[:, 0] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_assemble_rows_errors_before_writing(device):
    g = torch.Generator().manual_seed(4)
    args, shape = assemble_case(2, 10, 3, 4, 2, 6, torch.float32, device, g)
    out = torch.zeros(shape, device=device)
    bos, bank, bidx, stm, order, new, pe, pr = args
    cases = {
        r"bank_index .2, 3.* outside \[0, 10\)": (bos, bank, bidx + 9, stm, order, new, pe, pr),
        r"stm_order .4.* outside \[0, 4\)": (bos, bank, bidx, stm, order - 1, new, pe, pr),
        r"bos must be .*got .5": (bos[:5], bank, bidx, stm, order, new, pe, pr),
        r"bank_index must be .*with bank, got None": (bos, bank, None, stm, order, new, pe, pr),
        r"must have 1 \+ R \+ N \+ m = 9 rows": (bos, bank, bidx, stm, order, new[:, :1], pe, pr),
        r"pos_emb_rows=12": (bos, bank, bidx, stm, order, new, pe, 12),
        r"stm must be .*(Half|float16)": (bos, bank, bidx, stm.half(), order, new, pe, pr),
    }
    for msg, a in cases.items():
        with pytest.raises(ERR, match=msg):
            assemble_rows(*a, out)
        assert bool((out == 0).all()), msg


@pytest.mark.parametrize("device", DEVICES)
def test_assemble_rows_opcheck(device):
    g = torch.Generator().manual_seed(5)
    args, shape = assemble_case(2, 10, 3, 4, 2, 6, torch.float32, device, g)
    torch.library.opcheck(assemble_rows, (*args, torch.empty(shape, device=device)))
    args, shape = assemble_case(1, 10, 3, 4, 2, 6, torch.float32, device, g, False, False, False, 0)
    torch.library.opcheck(assemble_rows, (*args, torch.empty(shape, device=device)))

"""stm_update_: the native kernels and the reference against the reference implementation's
drop-and-concatenate (exact: pure data movement), validation before mutation, opcheck."""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.insertion import drop_and_concat_reference, materialize_stm, stm_update_reference
from mplus_fast.ops.testing import needs_native

ERR = (RuntimeError, ValueError)  # native TORCH_CHECK / reference
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (implementation, device): the native kernel of each device, and the reference (on the CPU)
IMPLS = [pytest.param(("native", "cpu"), marks=needs_native("stm_update_"), id="native-cpu"),
         pytest.param(("reference", "cpu"), id="reference-cpu")]
if torch.cuda.is_available():
    IMPLS.append(pytest.param(("native", "cuda"), marks=needs_native("stm_update_", "cuda"), id="native-cuda"))


def update_fn(impl):
    return torch.ops.mplus_fast.stm_update_ if impl == "native" else stm_update_reference


def rand_drop(L, N, T, g):
    return torch.stack([torch.randperm(N, generator=g)[:T] for _ in range(L)])


@pytest.mark.parametrize("impl_device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,N,T,d", [(1, 1, 1, 1), (2, 7, 3, 5), (3, 83, 7, 33), (1, 989, 83, 7), (2, 9, 9, 4), (1, 5, 0, 3)])
def test_stm_update_matches_drop_and_concat(impl_device, dtype, L, N, T, d):
    impl, device = impl_device
    stm_update_ = update_fn(impl)
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


@pytest.mark.parametrize("impl_device", IMPLS)
def test_stm_update_non_contiguous(impl_device):
    impl, device = impl_device
    stm_update_ = update_fn(impl)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 12, 10, generator=g).to(device)
    pool = big[:, :, 1:8]  # strided rows (non-contiguous pool, a view: must be updated in place)
    order = torch.arange(12).repeat(2, 1).to(device)
    stm = pool.clone()
    drop = rand_drop(2, 12, 4, g).to(device)
    new = torch.randn(2, 7, 4, generator=g).to(device).transpose(1, 2)  # non-contiguous (2, 4, 7)
    stm_update_(pool, order, drop, new)
    assert torch.equal(materialize_stm(big[:, :, 1:8], order), drop_and_concat_reference(stm, drop, new))


@pytest.mark.parametrize("impl_device", IMPLS)
def test_stm_update_validates_before_mutating(impl_device):
    impl, device = impl_device
    stm_update_ = update_fn(impl)
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


@pytest.mark.parametrize("impl_device", IMPLS)
def test_stm_update_opcheck(impl_device):
    _, device = impl_device
    pool = torch.randn(2, 9, 5, device=device)
    order = torch.stack([torch.randperm(9), torch.randperm(9)]).to(device)
    drop = torch.tensor([[8, 0, 4], [1, 2, 3]], device=device)
    torch.library.opcheck(torch.ops.mplus_fast.stm_update_, (pool, order, drop, torch.randn(2, 3, 5, device=device)))

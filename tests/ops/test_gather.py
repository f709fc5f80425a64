"""mplus_fast::gather_rows / gather_rows_out: parity with bank[index], opcheck, argument errors.

A gather is a copy, so the tolerance for every dtype is exact equality (the table below says so
once, rather than scattering torch.equal): any non-zero error is a bug.
"""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.gather import gather_rows_out_reference, gather_rows_reference
from mplus_fast.ops.testing import needs_native

TOLERANCE = {  # dtype -> (atol, rtol): a gather copies bytes, so exact for every dtype
    torch.float32: (0.0, 0.0), torch.bfloat16: (0.0, 0.0), torch.float16: (0.0, 0.0),
    torch.int64: (0.0, 0.0), torch.uint8: (0.0, 0.0), torch.bool: (0.0, 0.0),
}
CUDA = torch.cuda.is_available()
native = needs_native("gather_rows")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
cuda_native = needs_native("gather_rows", "cuda")

IMPLS = {
    "native": (torch.ops.mplus_fast.gather_rows, torch.ops.mplus_fast.gather_rows_out),
    "reference": (gather_rows_reference, gather_rows_out_reference),
}
impl_param = pytest.mark.parametrize("impl", [
    pytest.param("native", marks=native),
    "reference",
])


def make_bank(m: int, row: tuple[int, ...], dtype: torch.dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        x = torch.randint(0, 2, (m, *row), generator=g).bool()
    elif dtype.is_floating_point:
        x = torch.randn((m, *row), generator=g).to(dtype)
    else:
        x = torch.randint(-1000 if dtype.is_signed else 0, 1000, (m, *row), generator=g).to(dtype)
    return x.to(device)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    atol, rtol = TOLERANCE[expected.dtype]
    if expected.dtype.is_floating_point:
        err = (actual.double() - expected.double()).abs()
        bad = err > atol + rtol * expected.double().abs()
    else:
        bad = actual != expected
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ, first at {where}: "
                             f"{actual[where]} vs {expected[where]}")


# ---- parity ---------------------------------------------------------------------------------------
@impl_param
@pytest.mark.parametrize("r", [0, 1, 7, 83, 989])
@pytest.mark.parametrize("row", [(), (5,), (2, 3, 7)], ids=["scalar", "odd5", "kv2x3x7"])
def test_parity_shapes(impl, r, row):
    gather, _ = IMPLS[impl]
    bank = make_bank(1000, row, torch.float32)
    index = torch.randint(0, 1000, (r,))
    assert_same(gather(bank, index), bank[index], f"{impl} R={r} row={row}")


@impl_param
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_parity_dtypes(impl, dtype):
    gather, _ = IMPLS[impl]
    bank = make_bank(97, (2, 3, 11), dtype)  # (2, Hkv, D)-like rows, odd byte widths for 1/2-byte dtypes
    index = torch.randint(0, 97, (3, 83))  # (B, R)
    assert_same(gather(bank, index), bank[index], f"{impl} {dtype}")


@native
@pytest.mark.parametrize("m,row,dtype,r", [
    (2_000, (1_024,), torch.float32, 1_100),      # 4 KiB rows, 4.5 MB: streaming stores
    (70_000, (20,), torch.float32, 60_000),       # 80-byte rows: 64-byte blocks + a 16-byte tail
    (2_000, (2, 1_023), torch.bfloat16, 1_100),   # 4,092-byte rows: not a multiple of 16, memcpy
])
def test_large_gathers(m, row, dtype, r):
    """Gathers above the native kernel's streaming-store threshold (4 MiB), aligned or not."""
    bank = make_bank(m, row, dtype)
    index = torch.randint(0, m, (r,))
    assert_same(torch.ops.mplus_fast.gather_rows(bank, index), bank[index], f"large {row} {dtype}")
    out = torch.empty(r * torch.Size(row).numel() + 1, dtype=dtype)[1:].view(r, *row)  # misaligned out
    torch.ops.mplus_fast.gather_rows_out(bank, index, out)
    assert_same(out, bank[index], f"large misaligned out {row} {dtype}")


@impl_param
def test_noncontiguous_inputs(impl):
    gather, gather_out = IMPLS[impl]
    base = make_bank(300, (13, 6), torch.bfloat16)
    index = torch.randint(0, 150, (89, 14)).t()  # (14, 89), non-contiguous
    assert not index.is_contiguous()
    for name, bank in {"strided-rows": base[::2], "transposed-rows": base[:150].transpose(1, 2)}.items():
        assert_same(gather(bank, index), bank[index], f"{impl} {name}")
    out = torch.zeros(14, 89, 13, 6, dtype=torch.bfloat16)
    out_nc = torch.zeros(89, 14, 13, 6, dtype=torch.bfloat16).transpose(0, 1)  # non-contiguous out
    gather_out(base[::2], index, out_nc)
    assert_same(out_nc, base[::2][index], f"{impl} non-contiguous out")
    gather_out(base[::2], index, out)
    assert_same(out, base[::2][index], f"{impl} out")


@impl_param
def test_out_variant_into_buffer(impl):
    _, gather_out = IMPLS[impl]
    bank = make_bank(500, (2, 4, 16), torch.float16)
    index = torch.randint(0, 500, (2, 37))
    staging = torch.full((128, 2, 4, 16), 7.0, dtype=torch.float16)  # a larger staging buffer
    view = staging[:74].view(2, 37, 2, 4, 16)
    assert gather_out(bank, index, view) is None
    assert_same(view, bank[index], f"{impl} out view")
    assert bool((staging[74:] == 7.0).all()), "rows past the request were written"


def test_empty_bank_and_index():
    bank = torch.empty(0, 4)
    for gather, _ in IMPLS.values():
        assert gather(bank, torch.empty(0, dtype=torch.long)).shape == (0, 4)
        with pytest.raises(IndexError):
            gather(bank, torch.zeros(1, dtype=torch.long))


@native
def test_native_kernel_is_dispatched():
    # The CPU kernel must be the one running, not the CompositeExplicitAutograd reference.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mplus_fast::gather_rows", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mplus_fast::gather_rows_out", "CPU")


@native
def test_native_gather_releases_the_gil():
    """Python keeps running while one long native gather runs on another thread."""
    import threading
    import time

    bank = torch.ones(20_000, 1_024)
    index = torch.randint(0, 20_000, (20_000,))  # 80 MB out: tens of ms at least
    span, stamps = [], []

    def work():
        span.append(time.perf_counter())
        torch.ops.mplus_fast.gather_rows(bank, index)
        span.append(time.perf_counter())

    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = span
    # Held GIL: one gap as long as the call. Released: gaps of scheduler noise (a few ms).
    points = [t0 + 0.01, *(s for s in stamps if t0 + 0.01 < s < t1), t1]
    gap = max(b - a for a, b in zip(points, points[1:]))
    assert t1 - t0 < 0.05 or gap < 0.5 * (t1 - t0), f"Python stalled {gap:.3f} s during a {t1 - t0:.3f} s gather"


# ---- opcheck --------------------------------------------------------------------------------------
# All checks on one shape; schema + fake checks on the others (aot_dispatch compiles: slow on 2 cores).
@pytest.mark.parametrize("index_shape,utils", [
    ((3, 5), None), ((7,), ("test_schema", "test_faketensor")), ((0,), ("test_schema", "test_faketensor")),
])
def test_opcheck(index_shape, utils):
    kw = {} if utils is None else {"test_utils": utils}
    bank = make_bank(50, (2, 3), torch.float32)
    index = torch.randint(0, 50, index_shape)
    torch.library.opcheck(torch.ops.mplus_fast.gather_rows, (bank, index), **kw)
    out = torch.empty(*index_shape, 2, 3)
    torch.library.opcheck(torch.ops.mplus_fast.gather_rows_out, (bank, index, out), **kw)


# ---- errors: raised before anything is copied, naming the argument, its shape and the value --------
BAD = [
    ("negative", torch.tensor([3, -1, 2]), IndexError, ["index", "[3]", "-1", "position 1"]),
    ("too-large", torch.tensor([[0, 1], [40, 2]]), IndexError, ["index", "[2, 2]", "40", "[0, 40)"]),
    ("float", torch.tensor([1.0, 2.0]), TypeError, ["index", "int64", "[2]"]),
    ("int32", torch.tensor([1, 2], dtype=torch.int32), TypeError, ["index", "int64", "[2]"]),
    ("3-D", torch.zeros(2, 2, 2, dtype=torch.long), ValueError, ["index", "[2, 2, 2]"]),
    ("0-D", torch.tensor(3), ValueError, ["index", "[]"]),
]


@impl_param
@pytest.mark.parametrize("name,index,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_index_raises_before_copy(impl, name, index, exc, words):
    gather, gather_out = IMPLS[impl]
    bank = make_bank(40, (3,), torch.float32)
    with pytest.raises(exc) as info:
        gather(bank, index)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
    if index.dim() in (1, 2):
        out = torch.full((*index.shape, 3), -5.0)
        with pytest.raises(exc):
            gather_out(bank, index, out)
        assert bool((out == -5.0).all()), "out was written before the error"


@impl_param
def test_bad_out_raises(impl):
    _, gather_out = IMPLS[impl]
    bank = make_bank(40, (3,), torch.float32)
    index = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"out must have shape \[2, 3\].*got \[2, 4\]"):
        gather_out(bank, index, torch.empty(2, 4))
    with pytest.raises(ValueError, match="out has dtype"):
        gather_out(bank, index, torch.empty(2, 3, dtype=torch.float64))


@impl_param
def test_bad_bank_raises(impl):
    gather, _ = IMPLS[impl]
    with pytest.raises(ValueError, match=r"bank must be \(M, \.\.\.\).*\[\]"):
        gather(torch.tensor(1.0), torch.tensor([0]))


# ---- CUDA -----------------------------------------------------------------------------------------
@needs_cuda
@cuda_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
@pytest.mark.parametrize("r", [0, 1, 7, 83, 989])
def test_cuda_device_bank(dtype, r):
    bank = make_bank(1000, (2, 3, 5), dtype, device="cuda")
    index = torch.randint(0, 1000, (r,), device="cuda")
    assert_same(torch.ops.mplus_fast.gather_rows(bank, index), bank[index], f"cuda {dtype} R={r}")


@needs_cuda
@cuda_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("row", [(4096,), (2, 8, 128), (7,)])
def test_cuda_zero_copy(dtype, row):
    bank = make_bank(3000, row, dtype).pin_memory()
    index = torch.randint(0, 3000, (4, 83), device="cuda")
    out = torch.ops.mplus_fast.gather_rows(bank, index)
    assert out.is_cuda
    assert_same(out.cpu(), bank[index.cpu()], f"zero-copy {dtype} {row}")
    view = bank[100:]  # a view into the pinned allocation
    out2 = torch.empty(4, 83, *row, dtype=dtype, device="cuda")
    torch.ops.mplus_fast.gather_rows_out(view, index % 2900, out2)
    assert_same(out2.cpu(), view[(index % 2900).cpu()], "zero-copy from a view")


@needs_cuda
@cuda_native
def test_cuda_errors():
    bank = make_bank(40, (3,), torch.float32)
    with pytest.raises(ValueError, match="pinned"):
        torch.ops.mplus_fast.gather_rows(bank, torch.tensor([1], device="cuda"))
    out = torch.full((2, 3), -5.0, device="cuda")
    with pytest.raises(IndexError, match="40"):
        torch.ops.mplus_fast.gather_rows_out(bank.cuda(), torch.tensor([1, 40], device="cuda"), out)
    assert bool((out == -5.0).all())


@needs_cuda
@cuda_native
def test_cuda_opcheck():
    bank = make_bank(50, (2, 3), torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.mplus_fast.gather_rows, (bank, torch.randint(0, 50, (3, 5), device="cuda")))

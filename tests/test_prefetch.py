"""PrefetchEngine: asynchronous gathers of bank rows, many requests in flight, errors, lifetime."""
from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

import mplus_fast.prefetch as prefetch
from mplus_fast.prefetch import PrefetchEngine

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

CONFIGS = [
    pytest.param("cpu", "staged", id="cpu"),
    pytest.param("cuda", "staged", id="cuda-staged", marks=needs_cuda),
    pytest.param("cuda", "zero_copy", id="cuda-zero-copy", marks=needs_cuda),
]


def make_bank(m: int = 1000, row=(2, 3, 5), dtype=torch.float32) -> torch.Tensor:
    bank = torch.arange(m * torch.Size(row).numel(), dtype=torch.float64).reshape(m, *row).to(dtype)
    return bank.pin_memory() if CUDA else bank


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mplus-prefetch"]


@pytest.fixture
def blocked_gather(monkeypatch):
    """Make the worker's gather wait until the returned event is set (a request stays in flight)."""
    gate = threading.Event()
    real = prefetch._gather_rows

    def slow(bank, index):
        assert gate.wait(10)
        return real(bank, index)

    monkeypatch.setattr(prefetch, "_gather_rows", slow)
    yield gate
    gate.set()


@pytest.mark.parametrize("device,mode", CONFIGS)
def test_single_requests(device, mode):
    bank = make_bank()
    with PrefetchEngine(bank, device=device, num_staging=2, max_rows=256, mode=mode) as engine:
        for shape in [(0,), (1,), (7,), (83,), (3, 7), (2, 128)]:
            index = torch.randint(0, 1000, shape)
            out = engine.request(index).wait()
            assert out.device.type == device
            assert torch.equal(out.cpu(), bank[index]), f"shape {shape}"


@pytest.mark.parametrize("device,mode", CONFIGS)
def test_many_overlapping_requests(device, mode):
    """200 requests in flight over 4 staging buffers, random sizes and indices; all results checked,
    with the caller's index tensor overwritten right after each request (the engine must copy it)."""
    bank = make_bank(3000, (2, 4, 8), torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    scratch = torch.empty(300, dtype=torch.long)
    with PrefetchEngine(bank, device=device, num_staging=4, max_rows=300, mode=mode) as engine:
        handles, expected = [], []
        for i in range(200):
            r = int(torch.randint(0, 301, (1,), generator=g))
            index = scratch[:r]
            index.copy_(torch.randint(0, 3000, (r,), generator=g))
            if i % 3 == 0 and r % 2 == 0:
                index = index.view(2, r // 2)
            handles.append(engine.request(index))
            expected.append(bank[index])
            scratch.fill_(-1)  # clobber the caller's buffer while the request is queued
        for i in range(0, 200, 2):  # wait out of order
            assert torch.equal(handles[i].wait().cpu(), expected[i]), f"request {i}"
        for i in range(1, 200, 2):
            out = handles[i].wait()
            assert torch.equal(out.cpu(), expected[i]), f"request {i}"
        assert all(h.done() for h in handles)
        assert engine.in_flight() == 0


def test_requests_from_several_threads():
    bank = make_bank(500, (9,))
    errors = []
    with PrefetchEngine(bank, device="cpu", max_rows=64) as engine:
        def client(seed):
            g = torch.Generator().manual_seed(seed)
            for _ in range(25):
                index = torch.randint(0, 500, (int(torch.randint(1, 65, (1,), generator=g)),), generator=g)
                if not torch.equal(engine.request(index).wait(), bank[index]):
                    errors.append(seed)
        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_request_returns_before_the_gather(blocked_gather):
    bank = make_bank()
    with PrefetchEngine(bank, device="cpu", max_rows=16) as engine:
        handle = engine.request(torch.tensor([5, 6]))
        time.sleep(0.05)
        assert not handle.done()
        assert engine.in_flight() == 1
        blocked_gather.set()
        assert torch.equal(handle.wait(timeout=10), bank[[5, 6]])
        assert handle.done()


@pytest.mark.parametrize("index,exc,words", [
    (torch.tensor([1, -2]), IndexError, ["-2", "[2]"]),
    (torch.tensor([[0], [1000]]), IndexError, ["1000", "[2, 1]"]),
    (torch.tensor([1.0]), TypeError, ["int64"]),
    (torch.zeros(1, 1, 1, dtype=torch.long), ValueError, ["[1, 1, 1]"]),
    (torch.zeros(17, dtype=torch.long), ValueError, ["max_rows=16", "17"]),
])
def test_bad_index_raises_at_request(monkeypatch, index, exc, words):
    calls = []
    monkeypatch.setattr(prefetch, "_gather_rows", lambda *a: calls.append(a))
    with PrefetchEngine(make_bank(), device="cpu", max_rows=16) as engine:
        with pytest.raises(exc) as info:
            engine.request(index)
        for word in words:
            assert word in str(info.value)
        assert engine.in_flight() == 0
    assert calls == [], "the worker ran a gather for a rejected request"


def test_worker_exception_propagates_and_worker_survives(monkeypatch):
    real = prefetch._gather_rows

    def flaky(bank, index):
        if index.numel() == 3:
            raise RuntimeError("boom from the worker")
        return real(bank, index)

    monkeypatch.setattr(prefetch, "_gather_rows", flaky)
    bank = make_bank()
    with PrefetchEngine(bank, device="cpu", max_rows=16) as engine:
        bad = engine.request(torch.tensor([1, 2, 3]))
        good = engine.request(torch.tensor([4, 5]))
        with pytest.raises(RuntimeError, match="boom from the worker"):
            bad.wait()
        assert bad.done()
        assert torch.equal(good.wait(), bank[[4, 5]])


def test_set_bank(blocked_gather):
    bank = make_bank(100, (4,))
    with PrefetchEngine(bank, device="cpu", max_rows=16) as engine:
        handle = engine.request(torch.tensor([99]))
        grown = torch.cat([bank, make_bank(20, (4,)) + 1e6])
        with pytest.raises(RuntimeError, match="in flight"):
            engine.set_bank(grown)
        blocked_gather.set()
        assert torch.equal(handle.wait(), bank[[99]])
        with pytest.raises(IndexError, match="110"):
            engine.request(torch.tensor([110]))
        engine.set_bank(grown)
        assert engine.bank is grown
        assert torch.equal(engine.gather(torch.tensor([110, 3])), grown[[110, 3]])
        with pytest.raises(ValueError, match="rows must stay"):
            engine.set_bank(torch.zeros(10, 5))
        with pytest.raises(ValueError, match="rows must stay"):
            engine.set_bank(grown.double())


def test_close_joins_thread_and_drains():
    before = len(prefetch_threads())
    bank = make_bank()
    engine = PrefetchEngine(bank, device="cpu", max_rows=64)
    assert len(prefetch_threads()) == before + 1
    handles = [engine.request(torch.randint(0, 1000, (64,))) for _ in range(20)]
    engine.close()
    assert len(prefetch_threads()) == before
    assert all(h.done() for h in handles)  # queued work finished before the thread stopped
    with pytest.raises(RuntimeError, match="closed"):
        engine.request(torch.tensor([1]))
    engine.close()  # idempotent


def test_garbage_collected_engine_stops_its_thread():
    before = len(prefetch_threads())
    engine = PrefetchEngine(make_bank(), device="cpu", max_rows=8)
    engine.request(torch.tensor([1])).wait()
    del engine
    gc.collect()
    for _ in range(100):
        if len(prefetch_threads()) == before:
            break
        time.sleep(0.01)
    assert len(prefetch_threads()) == before


def test_bad_construction():
    with pytest.raises(ValueError, match="CPU tensor"):
        PrefetchEngine(torch.zeros(()), device="cpu")
    with pytest.raises(ValueError, match="mode"):
        PrefetchEngine(make_bank(), device="cpu", mode="dma")
    with pytest.raises(ValueError, match="zero_copy"):
        PrefetchEngine(make_bank(), device="cpu", mode="zero_copy")
    with pytest.raises(ValueError, match="num_staging"):
        PrefetchEngine(make_bank(), device="cpu", num_staging=0)


@needs_cuda
def test_cuda_result_is_safe_on_the_consumer_stream():
    bank = make_bank(5000, (1024,))
    with PrefetchEngine(bank, device="cuda", num_staging=2, max_rows=2048) as engine:
        consumer = torch.cuda.Stream()
        with torch.cuda.stream(consumer):
            index = torch.randint(0, 5000, (2048,))
            out = engine.request(index).wait()  # consumer waits on the copy event, no host sync
            total = out.sum(dim=1)
        consumer.synchronize()
        assert torch.equal(total.cpu(), bank[index].cuda().sum(dim=1).cpu())


@needs_cuda
def test_cuda_zero_copy_needs_pinned_bank():
    with pytest.raises(ValueError, match="pinned"):
        PrefetchEngine(torch.zeros(10, 4), device="cuda", mode="zero_copy")


@pytest.mark.parametrize("device,mode", CONFIGS)
def test_request_into_preallocated_out(device, mode):
    bank = make_bank(300, (6,), torch.float16)
    with PrefetchEngine(bank, device=device, num_staging=2, max_rows=64, mode=mode) as engine:
        static = torch.zeros(4, 16, 6, dtype=torch.float16, device=device)
        idxs = [torch.randint(0, 300, (16,)) for _ in range(4)]
        handles = [engine.request(idx, out=static[i]) for i, idx in enumerate(idxs)]
        results = [h.wait() for h in handles]
        for i, idx in enumerate(idxs):
            assert results[i].data_ptr() == static[i].data_ptr()
            assert torch.equal(static[i].cpu(), bank[idx])
        with pytest.raises(ValueError, match=r"out must be \[16, 6\]"):
            engine.request(torch.zeros(16, dtype=torch.long), out=torch.zeros(16, 5, dtype=torch.float16))
        with pytest.raises(ValueError, match="out must be"):
            engine.request(torch.zeros(16, dtype=torch.long), out=torch.zeros(16, 6))
    idx = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(1))
    with PrefetchEngine(bank, device=device, max_rows=64, mode=mode) as engine:
        out = torch.full((16, 6), -1.0, dtype=torch.float16, device=device)
        assert torch.equal(engine.request(idx, out=out).wait().cpu(), bank[idx])
        assert torch.equal(out.cpu(), bank[idx])


def test_swapped_bank_is_released():
    import weakref

    bank = make_bank(100, (4,))
    ref = weakref.ref(bank)
    with PrefetchEngine(bank, device="cpu", max_rows=8) as engine:
        engine.request(torch.tensor([1, 2])).wait()
        engine.set_bank(make_bank(120, (4,)))
        del bank
        gc.collect()
        assert ref() is None, "the engine (or its worker) still holds the old bank"

"""PrefetchEngine: asynchronous gathers of bank rows, many requests in flight, errors, lifetime."""
from __future__ import annotations

import gc
import random
import threading
import time
import weakref

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


def test_set_bank_waits_for_the_request_in_flight(blocked_gather):
    """set_bank does not raise while a request is in flight: it returns once that request no longer
    reads the old bank, which then answers from the old bank; later requests use the new one."""
    bank = make_bank(100, (4,))
    with PrefetchEngine(bank, device="cpu", max_rows=16) as engine:
        handle = engine.request(torch.tensor([99]))
        grown = torch.cat([bank, make_bank(20, (4,)) + 1e6])
        swapper = threading.Thread(target=engine.set_bank, args=(grown,))
        swapper.start()
        swapper.join(0.2)
        assert swapper.is_alive(), "set_bank returned while the old bank was still being read"
        blocked_gather.set()
        swapper.join(10)
        assert not swapper.is_alive()
        assert torch.equal(handle.wait(), bank[[99]])
        assert engine.bank is grown
        assert torch.equal(engine.gather(torch.tensor([110, 3])), grown[[110, 3]])
        with pytest.raises(ValueError, match="rows must stay"):
            engine.set_bank(torch.zeros(10, 5))
        with pytest.raises(ValueError, match="rows must stay"):
            engine.set_bank(grown.double())


def test_index_past_the_old_bank_is_refused():
    bank = make_bank(100, (4,))
    with PrefetchEngine(bank, device="cpu", max_rows=16) as engine:
        with pytest.raises(IndexError, match="110"):
            engine.request(torch.tensor([110]))
        engine.set_bank(make_bank(120, (4,)))
        assert engine.gather(torch.tensor([110])).shape == (1, 4)


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
        with pytest.raises(ValueError, match=r"out must be a contiguous \[16, 6\]"):
            engine.request(torch.zeros(16, dtype=torch.long), out=torch.zeros(16, 5, dtype=torch.float16))
        with pytest.raises(ValueError, match="out must be"):
            engine.request(torch.zeros(16, dtype=torch.long), out=torch.zeros(16, 6))
    idx = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(1))
    with PrefetchEngine(bank, device=device, max_rows=64, mode=mode) as engine:
        out = torch.full((16, 6), -1.0, dtype=torch.float16, device=device)
        assert torch.equal(engine.request(idx, out=out).wait().cpu(), bank[idx])
        assert torch.equal(out.cpu(), bank[idx])


def test_swapped_bank_is_released():
    bank = make_bank(100, (4,))
    ref = weakref.ref(bank)
    with PrefetchEngine(bank, device="cpu", max_rows=8) as engine:
        engine.request(torch.tensor([1, 2])).wait()
        engine.set_bank(make_bank(120, (4,)))
        del bank
        gc.collect()
        assert ref() is None, "the engine (or its worker) still holds the old bank"


# ---- the CUDA paths on the CPU: a stand-in runtime whose device work runs late -------------------
class FakeStream:
    """A device stream as a FIFO of deferred operations: each runs only when an event recorded
    after it is waited for (or, at random, when one is queried: the device making progress), and
    reads its sources THEN, as a DMA or a kernel does."""

    def __init__(self, rt):
        self.rt, self.ops, self.done = rt, [], 0
        self.lock = threading.RLock()

    def enqueue(self, fn) -> None:
        with self.lock:
            self.ops.append(fn)

    def run_until(self, mark: int) -> None:
        with self.lock:
            while self.done < mark:
                self.ops[self.done]()
                self.done += 1  # only once the operation has finished

    def reached(self, mark: int) -> bool:
        with self.lock:  # not while an operation is half done
            return self.done >= mark


class FakeEvent:
    def __init__(self, stream: FakeStream):
        self.stream = stream
        with stream.lock:
            self.mark = len(stream.ops)

    def query(self) -> bool:
        if self.stream.rt.progress():
            self.stream.run_until(self.mark)
        return self.stream.reached(self.mark)

    def synchronize(self) -> None:
        self.stream.run_until(self.mark)


class FakeRuntime:
    """prefetch.CudaRuntime's interface over CPU tensors. Device results start as NaN; a
    zero-copy kernel that runs after its bank or index was freed records an error."""

    def __init__(self, seed: int = 0, progress: float = 0.3):
        self.device = torch.device("cpu")
        self.consumer = FakeStream(self)
        self.errors: list[str] = []
        self.pinned_allocations: list[int] = []
        self._rng, self._p, self._lock = random.Random(seed), progress, threading.Lock()

    def progress(self) -> bool:
        with self._lock:
            return self._rng.random() < self._p

    def new_stream(self):
        return FakeStream(self)

    def current_stream(self):
        return self.consumer

    def record_event(self, stream):
        return FakeEvent(stream)

    def wait_event(self, stream, event) -> None:
        event.synchronize()  # the consumer's later work (here: the test reading `out`) comes after

    def record_stream(self, tensor, stream) -> None:
        pass

    def empty(self, shape, dtype, stream):
        return torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else torch.full(shape, -7, dtype=dtype)

    def pinned(self, shape, dtype):
        t = torch.empty(shape, dtype=dtype)
        self.pinned_allocations.append(t.numel() * t.element_size())
        return t

    def is_pinned(self, t) -> bool:
        return True

    def copy_async(self, dst, src, stream) -> None:
        stream.enqueue(lambda: dst.copy_(src))

    def gather_zero_copy(self, bank, index, out, stream) -> None:
        bank_ref, index_ref = weakref.ref(bank), weakref.ref(index)  # the kernel holds no reference

        def kernel():
            b, i = bank_ref(), index_ref()
            if b is None or i is None:
                self.errors.append("a zero-copy kernel read a bank or index that was already freed")
                return
            out.copy_(b[i])

        stream.enqueue(kernel)


FAKE_MODES = ["staged", "zero_copy"]


def fake_engine(bank, mode, seed=0, progress=0.3, **kw):
    rt = FakeRuntime(seed, progress)
    return PrefetchEngine(bank, mode=mode, runtime=rt, **kw), rt


@pytest.mark.parametrize("mode", FAKE_MODES)
def test_fake_runtime_results_and_out(mode):
    bank = make_bank(800, (2, 3), torch.bfloat16)
    engine, rt = fake_engine(bank, mode, max_rows=300, num_staging=2)
    with engine:
        g = torch.Generator().manual_seed(1)
        idx = [torch.randint(0, 800, (r,), generator=g) for r in (0, 1, 7, 300, 299)]
        handles = [engine.request(i) for i in idx]
        static = torch.zeros(2, 5, 2, 3, dtype=torch.bfloat16)
        into = engine.request(idx[2][:5].view(1, 5).expand(2, 5).contiguous(), out=static)
        for h, i in zip(handles, idx):
            assert torch.equal(h.wait(), bank[i])
        assert into.wait().data_ptr() == static.data_ptr() and torch.equal(static, bank[idx[2][:5]].expand(2, 5, 2, 3))
    assert rt.errors == []


def test_fake_runtime_catches_a_missing_wait(monkeypatch):
    """The stand-in has teeth: if the handle did not make the consumer wait for the copy's event,
    the rows read would not be the bank's (they are still NaN)."""
    bank = make_bank(50, (4,))
    engine, rt = fake_engine(bank, "staged", progress=0.0, max_rows=8)
    monkeypatch.setattr(rt, "wait_event", lambda stream, event: None)
    with engine:
        out = engine.request(torch.tensor([1, 2, 3])).wait()
        assert not torch.equal(out, bank[[1, 2, 3]])


def test_staging_block_is_not_reused_while_a_copy_reads_it():
    """One staging block, 30 requests issued before any is waited for: each gather must wait for
    the previous copy (still deferred) before overwriting the block."""
    bank = make_bank(400, (16,))
    engine, rt = fake_engine(bank, "staged", progress=0.0, max_rows=64, num_staging=1)
    g = torch.Generator().manual_seed(2)
    with engine:
        idx = [torch.randint(0, 400, (64,), generator=g) for _ in range(30)]
        handles = [engine.request(i) for i in idx]
        for n, (h, i) in enumerate(zip(handles, idx)):
            assert torch.equal(h.wait(), bank[i]), f"request {n} read another request's staging"
        assert engine.pinned_bytes() == 64 * 16 * 4 == sum(rt.pinned_allocations)


def test_pinned_staging_grows_in_bounded_steps():
    """Blocks of at most 8 MiB, allocated one at a time, only while every block is busy, never
    beyond num_staging requests of max_rows rows; reported by pinned_bytes()."""
    row = (2, 8, 128)  # 8 KiB float32 rows (K and V of 8 heads x 128)
    bank = make_bank(3000, row, torch.float32)
    row_bytes = 2 * 8 * 128 * 4
    engine, rt = fake_engine(bank, "staged", progress=0.0, max_rows=2560, num_staging=3)
    block = (8 << 20) // row_bytes * row_bytes
    per_request = -(-2560 * row_bytes // block)  # 3 blocks of 1,024 rows
    cap = 3 * per_request * block
    with engine:
        assert engine.pinned_bytes() == 0  # nothing before the first request
        engine.request(torch.randint(0, 3000, (10,))).wait()
        assert engine.pinned_bytes() == block  # one block, not the whole cap
        for _ in range(3):  # sequential requests reuse the same blocks
            engine.request(torch.randint(0, 3000, (2560,))).wait()
        assert engine.pinned_bytes() == per_request * block
        idx = [torch.randint(0, 3000, (2560,)) for _ in range(8)]
        handles = [engine.request(i) for i in idx]
        for h in handles:  # the worker has issued all 8 (waiting at the cap for the oldest copies)
            h._future.result(30)
        for h, i in zip(handles, idx):
            assert torch.equal(h.wait(), bank[i])
        assert engine.pinned_bytes() == cap == sum(rt.pinned_allocations)
        assert set(rt.pinned_allocations) == {block}
    assert rt.errors == []


def test_zero_copy_keeps_bank_and_index_until_the_kernel_completes():
    bank = make_bank(100, (4,))
    engine, rt = fake_engine(bank, "zero_copy", progress=0.0, max_rows=16)
    with engine:
        handle = engine.request(torch.tensor([5, 6, 7]))
        assert handle._future.result(10) is not None  # the kernel is issued, not run
        gc.collect()
        assert any(refs[0] is bank for _, refs in engine._worker.retained)
        assert torch.equal(handle.wait(), bank[[5, 6, 7]])
        engine.set_bank(make_bank(120, (4,)))
        ref = weakref.ref(bank)
        del bank
        gc.collect()
        assert ref() is None, "the old bank is still held after its kernel completed"
    assert rt.errors == []


@pytest.mark.parametrize("mode", FAKE_MODES)
def test_set_bank_waits_for_device_reads_of_the_old_bank(mode):
    """After set_bank returns the caller may overwrite the old bank: a zero-copy kernel still
    pending on it must have run first (a staged copy reads its staging block, not the bank)."""
    old = make_bank(200, (8,))
    engine, rt = fake_engine(old, mode, progress=0.0, max_rows=64)
    with engine:
        idx = torch.randint(0, 200, (64,))
        expect = old[idx].clone()
        handle = engine.request(idx)
        engine.set_bank(make_bank(200, (8,)) + 1e6)
        old.fill_(-1.0)  # allowed now
        assert torch.equal(handle.wait(), expect)
    assert rt.errors == []


@pytest.mark.parametrize("device", ["cpu", "fake-staged", "fake-zero_copy"])
def test_an_exception_between_request_and_wait_leaves_the_engine_usable(device):
    bank = make_bank(300, (6,))
    if device == "cpu":
        engine, rt = PrefetchEngine(bank, device="cpu", max_rows=32), None
    else:
        engine, rt = fake_engine(bank, device.split("-")[1], progress=0.0, max_rows=32, num_staging=1)
    with engine:
        for _ in range(5):
            with pytest.raises(KeyError):
                engine.request(torch.randint(0, 300, (32,)))
                raise KeyError("the caller failed before waiting")
        grown = torch.cat([bank, bank + 1000])
        engine.set_bank(grown)
        idx = torch.randint(0, 600, (32,))
        assert torch.equal(engine.request(idx).wait(), grown[idx])
        engine.drain()
        assert engine.in_flight() == 0
    assert rt is None or rt.errors == []


def _versioned_bank(version: int, m: int) -> torch.Tensor:
    """Row r of version v holds [v, r, r + 0.5]: a wrong row, or a row of another bank, shows."""
    r = torch.arange(m, dtype=torch.float64)
    return torch.stack([torch.full((m,), float(version), dtype=torch.float64), r, r + 0.5], 1).float()


@pytest.mark.parametrize("device", ["cpu", "fake-staged", "fake-zero_copy"])
def test_threaded_stress_with_bank_swaps(device):
    """4 client threads x 60 requests of random sizes and a thread swapping in grown banks (and
    poisoning each old bank once set_bank has returned): every row is right, from one bank that
    was current while its request was made; 0 wrong rows."""
    m0 = 500
    bank = _versioned_bank(0, m0)
    if device == "cpu":
        engine, rt = PrefetchEngine(bank, device="cpu", max_rows=200), None
    else:
        engine, rt = fake_engine(bank, device.split("-")[1], seed=7, progress=0.2, max_rows=200, num_staging=2)
    lo, hi = [0], [0]  # versions: lo is current (set_bank returned), hi may already be served
    wrong, checked, stop = [], [0], threading.Event()

    def client(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(60):
            n = int(torch.randint(0, 201, (1,), generator=g))
            v0 = lo[0]
            idx = torch.randint(0, m0, (n,), generator=g)  # rows every version has
            handle = engine.request(idx)
            v1 = hi[0]
            if int(torch.randint(0, 5, (1,), generator=g)) == 0:
                continue  # never waited for
            rows = handle.wait()
            ok = rows.shape == (n, 3) and (n == 0 or (
                bool((rows[:, 0] == rows[0, 0]).all()) and v0 <= rows[0, 0] <= v1
                and torch.equal(rows[:, 1], idx.float()) and torch.equal(rows[:, 2], idx.float() + 0.5)))
            if not ok:
                wrong.append((seed, n, v0, v1, rows[:3].tolist()))
            checked[0] += n

    def swapper():
        v = 0
        while not stop.is_set():
            v += 1
            old, new = engine.bank, _versioned_bank(v, m0 + 7 * v)
            hi[0] = v
            engine.set_bank(new)
            lo[0] = v
            old.fill_(-1.0)  # the engine promised nobody reads it any more
            time.sleep(0.002)

    with engine:
        clients = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        swap = threading.Thread(target=swapper)
        swap.start()
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        stop.set()
        swap.join(10)
        engine.drain()
        assert engine.in_flight() == 0
    assert wrong == [], f"{len(wrong)} wrong results, e.g. {wrong[:2]}"
    assert checked[0] > 5000
    assert rt is None or rt.errors == []

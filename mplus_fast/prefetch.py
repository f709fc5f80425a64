"""Asynchronous prefetch of rows of a CPU-resident bank (the long-term memory in low-memory mode).

    engine = PrefetchEngine(bank, device="cuda", num_staging=2, max_rows=2560)
    handle = engine.request(index)      # returns at once; index validated first (raises before any copy)
    ...                                 # overlap: projections, attention over [bos, STM, prompt]
    rows = handle.wait()                # (*index.shape, *row) on `device`, safe on the current stream

Design trade-off: staging + stream copy (mode="staged", the default) vs zero-copy (mode="zero_copy")
  * staged: a worker thread gathers the requested rows with the native multithreaded CPU gather
    (GIL released) into pinned staging blocks, and copies each block to the device with
    cudaMemcpyAsync on a dedicated copy stream: the DMA runs at full PCIe bandwidth on the copy
    engine, uses no SM, and overlaps compute on other streams (and the gather of the next block).
    Costs: CPU memory bandwidth for the gather, host threads, and the staging blocks.
  * zero-copy: the GPU gather kernel reads the rows straight from the pinned bank through its
    mapped device pointer (csrc/kernels/gather.cuh). No staging memory, no host gather, one pass
    over PCIe; but the reads are SM-issued 16-byte transactions (lower achieved PCIe bandwidth than
    a DMA for large gathers) and the kernel occupies SMs while it waits on PCIe, competing with the
    compute it should hide behind. Good for small/scattered fetches or when host memory bandwidth
    or host cores are scarce; the bank must be pinned.
  On a CPU device the same API gathers with the native threaded kernel on the worker thread and
  returns a CPU tensor (no staging: the result is gathered straight into it).

Memory safety on a GPU, where the host does not wait for the device:
  * Staging is a pool of pinned blocks of fixed size, grown one block at a time (only when every
    block is busy) up to `num_staging` requests of `max_rows` rows: bounded steps, never
    reallocated, so the caching host allocator never holds freed copies. A block is reused only
    once the copy that reads it has completed (its event); at the cap a request waits for the
    oldest copy instead of failing. `pinned_bytes()` reports the pool.
  * In zero-copy mode the worker keeps the bank (and the pinned index) alive until the event of
    the kernel that reads them has completed, even if the caller drops them at once.
  * `set_bank(new)` swaps the bank for later requests and returns once no earlier request still
    reads the old one (host gathers done; zero-copy kernels completed): the caller may then
    modify or free the old bank. `drain()` waits for every request to finish entirely; call it
    before changing a bank in place (e.g. compacting rows) that requests may still read.
  * A request whose handle is never waited for (an exception in between) completes on its own
    and is forgotten: the engine stays usable.
The CUDA operations go through a small runtime object (`CudaRuntime`), so the tests substitute a
stand-in whose copies and kernels run late (at their event), where a missing wait reads wrong rows.

Requests are served in FIFO order by one worker thread per engine (the gather itself is
multithreaded inside the op). Exceptions raised in the worker are re-raised by `handle.wait()`.
`close()` (or leaving the `with` block) drains pending requests and joins the thread; an engine
that is garbage-collected is closed too.
"""
from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import weakref

import torch

import mplus_fast.ops  # noqa: F401  (loads the native library and defines the ops)
from mplus_fast.ops.gather import check_index

__all__ = ["PrefetchEngine", "PrefetchHandle", "CudaRuntime"]

MODES = ("staged", "zero_copy")
BLOCK_BYTES = 8 << 20  # staging block: large enough for a full-bandwidth DMA, small enough to grow by


def _gather_rows(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.ops.mplus_fast.gather_rows(bank, index)


def _gather_rows_out(bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    torch.ops.mplus_fast.gather_rows_out(bank, index, out)


class CudaRuntime:
    """The CUDA operations of the engine, in one place: streams, events, device and pinned
    allocations, the async copy and the zero-copy gather."""

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def record_event(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def empty(self, shape, dtype, stream) -> torch.Tensor:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return torch.empty(shape, dtype=dtype, device=self.device)

    def pinned(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.is_pinned()

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def gather_zero_copy(self, bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor, stream) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            _gather_rows_out(bank, index, out)  # pinned host index -> kernel reads bank rows over PCIe


class PrefetchHandle:
    """The pending result of `PrefetchEngine.request`."""

    def __init__(self, shape: tuple[int, ...], runtime: CudaRuntime | None):
        self.shape = shape
        self._rt = runtime
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._event = None  # set by the worker before the future resolves (device engines)

    def done(self) -> bool:
        """Non-blocking: True once the rows are on the device (or the request failed)."""
        if not self._future.done():
            return False
        return self._event is None or self._future.exception() is not None or self._event.query()

    def _finish(self, timeout: float | None = None) -> None:
        """Block until the request has completed entirely (device work included); never raises
        the request's own error."""
        concurrent.futures.wait([self._future], timeout)
        if self._future.done() and self._future.exception() is None and self._event is not None:
            self._event.synchronize()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The gathered rows, (*index.shape, *row). On a GPU, the caller's current stream is made
        to wait for the copy (no host synchronisation) and the tensor is recorded on it."""
        out = self._future.result(timeout)  # re-raises the worker's exception
        if self._event is not None:
            stream = self._rt.current_stream()
            self._rt.wait_event(stream, self._event)
            self._rt.record_stream(out, stream)
        return out

    result = wait


class _Staging:
    """Pinned staging blocks of `block_bytes`, grown one at a time up to `max_blocks`. A block
    handed to a copy stays busy until that copy's event has completed. Worker thread only."""

    def __init__(self, runtime: CudaRuntime, block_bytes: int, max_blocks: int):
        self.rt, self.block_bytes, self.max_blocks = runtime, block_bytes, max_blocks
        self.blocks: list[torch.Tensor] = []
        self.busy: list = []       # per block: the event of the copy reading it, or None
        self.released: list = []   # per block: when it was last handed to a copy (oldest first)
        self.clock = 0

    def nbytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def _is_free(self, i: int) -> bool:
        if self.busy[i] is not None and self.busy[i].query():
            self.busy[i] = None
        return self.busy[i] is None

    def acquire(self, count: int) -> list[int]:
        """`count` free blocks (count <= max_blocks): free ones first, then one new block per
        step while under the cap, else wait for the oldest copy still reading a block."""
        chosen: list[int] = []
        while len(chosen) < count:
            chosen += [i for i in range(len(self.blocks)) if i not in chosen and self._is_free(i)][:count - len(chosen)]
            if len(chosen) == count:
                break
            if len(self.blocks) < self.max_blocks:
                self.blocks.append(self.rt.pinned((self.block_bytes,), torch.uint8))
                self.busy.append(None)
                self.released.append(0)
                continue
            busy = [i for i in range(len(self.blocks)) if i not in chosen and self.busy[i] is not None]
            oldest = min(busy, key=lambda i: self.released[i])
            self.busy[oldest].synchronize()
            self.busy[oldest] = None
        return chosen

    def release(self, blocks: list[int], event) -> None:
        self.clock += 1
        for i in blocks:
            self.busy[i], self.released[i] = event, self.clock

    def synchronize(self) -> None:
        for event in self.busy:
            if event is not None:
                event.synchronize()


class _Worker:
    """Owns the thread, the queue, the staging pool, the copy stream and the references kept for
    device work in flight (not the engine, so an abandoned engine can be collected and stopped)."""

    def __init__(self, runtime: CudaRuntime | None, mode: str, staging: _Staging | None):
        self.rt, self.mode, self.staging = runtime, mode, staging
        self.stream = runtime.new_stream() if runtime is not None else None
        self.retained: collections.deque = collections.deque()  # (event, refs) of zero-copy kernels
        self.retained_lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mplus-prefetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        with self.retained_lock:  # the last kernels may still read what they retain
            for event, _ in self.retained:
                event.synchronize()
            self.retained.clear()
        if self.staging is not None:
            self.staging.synchronize()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            handle, bank, index, out, ready = job
            self.release_retained()
            try:
                out, event = self._execute(bank, index, out, ready)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                handle._future.set_exception(exc)
                event = exc = None
            else:
                handle._event = event
                handle._future.set_result(out)
            del job, handle, bank, index, out, ready  # hold no bank (or result) between requests

    def release_retained(self) -> None:
        """Drop the references of zero-copy kernels that have completed (any thread)."""
        with self.retained_lock:
            while self.retained and self.retained[0][0].query():
                self.retained.popleft()

    def _execute(self, bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None, ready):
        if self.rt is None:  # CPU device: synchronous gather on this thread
            if out is None:
                return _gather_rows(bank, index), None
            _gather_rows_out(bank, index, out)
            return out, None
        rt, stream = self.rt, self.stream
        if out is None:
            out = rt.empty((*index.shape, *bank.shape[1:]), bank.dtype, stream)
        else:
            rt.wait_event(stream, ready)  # the caller's pending work on `out` comes first
            rt.record_stream(out, stream)
        if self.mode == "zero_copy":
            rt.gather_zero_copy(bank, index, out, stream)
            event = rt.record_event(stream)
            with self.retained_lock:
                self.retained.append((event, (bank, index)))  # read by the kernel until the event
            return out, event
        return out, self._staged_copy(bank, index, out)

    def _staged_copy(self, bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor):
        """Host gather into staging blocks, one async copy per block; returns the last copy's event."""
        row = tuple(bank.shape[1:])
        row_bytes = max(torch.Size(row).numel() * bank.element_size(), 1)
        per_block = max(self.staging.block_bytes // row_bytes, 1)
        flat_index, flat_out = index.reshape(-1), out.view(-1, *row)
        spans = [(r0, min(r0 + per_block, flat_index.numel())) for r0 in range(0, flat_index.numel(), per_block)]
        blocks = self.staging.acquire(len(spans))
        for (r0, r1), b in zip(spans, blocks):
            stage = self.staging.blocks[b][: (r1 - r0) * row_bytes].view(bank.dtype).view(r1 - r0, *row)
            _gather_rows_out(bank, flat_index[r0:r1], stage)  # threaded host gather, GIL released
            self.rt.copy_async(flat_out[r0:r1], stage, self.stream)  # DMA on the copy stream
        event = self.rt.record_event(self.stream)
        self.staging.release(blocks, event)
        return event


class PrefetchEngine:
    """Gather rows of a CPU bank by index, asynchronously, onto `device` (see the module notes).

    bank:        (M, *row) CPU tensor, any dtype (pinned when CUDA is used; required for zero_copy).
    device:      where results go; default CUDA when available, else CPU.
    num_staging: requests whose staging may be in flight at once (staged CUDA mode; unused on CPU
                 and in zero_copy mode, where nothing is staged): the pool's cap is num_staging
                 requests of max_rows rows, in blocks of at most 8 MiB.
    max_rows:    the largest request (B * R rows) accepted.
    mode:        "staged" (gather on host + bulk copy) or "zero_copy" (GPU kernel reads pinned bank).
    """

    def __init__(self, bank: torch.Tensor, device: torch.device | str | None = None, num_staging: int = 2,
                 max_rows: int = 4096, mode: str = "staged", *, runtime: CudaRuntime | None = None):
        if runtime is not None:  # a stand-in runtime (tests) decides the device
            device = runtime.device
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if runtime is None and device.type == "cuda":
            runtime = CudaRuntime(device)
        if mode not in MODES:
            raise ValueError(f"PrefetchEngine: mode must be one of {MODES}, got {mode!r}")
        if mode == "zero_copy" and runtime is None:
            raise ValueError(f"PrefetchEngine: mode='zero_copy' needs a CUDA device, got {device}")
        if num_staging < 1:
            raise ValueError(f"PrefetchEngine: num_staging must be >= 1, got {num_staging}")
        if max_rows < 1:
            raise ValueError(f"PrefetchEngine: max_rows must be >= 1, got {max_rows}")
        self.device, self.mode, self.max_rows, self._rt = device, mode, int(max_rows), runtime
        self._check_bank(bank, first=True)
        self._bank = bank
        self._row_shape, self._dtype = tuple(bank.shape[1:]), bank.dtype
        staging = None
        if runtime is not None and mode == "staged":
            row_bytes = max(torch.Size(self._row_shape).numel() * bank.element_size(), 1)
            per_block = max(min(BLOCK_BYTES // row_bytes, self.max_rows), 1)
            blocks_per_request = -(-self.max_rows // per_block)
            staging = _Staging(runtime, per_block * row_bytes, num_staging * blocks_per_request)
        self._lock = threading.Lock()
        self._inflight: collections.deque[PrefetchHandle] = collections.deque()
        self._closed = False
        self._worker = _Worker(runtime, mode, staging)
        self._finalizer = weakref.finalize(self, self._worker.stop)

    # -- bank -------------------------------------------------------------------------------
    @property
    def bank(self) -> torch.Tensor:
        return self._bank

    def _check_bank(self, bank: torch.Tensor, first: bool = False) -> None:
        if not isinstance(bank, torch.Tensor) or bank.device.type != "cpu" or bank.dim() < 1:
            desc = f"{type(bank).__name__} on {bank.device} with shape {list(bank.shape)}" if isinstance(
                bank, torch.Tensor) else type(bank).__name__
            raise ValueError(f"PrefetchEngine: bank must be a CPU tensor (M, ...), got {desc}")
        if self.mode == "zero_copy" and not self._rt.is_pinned(bank):
            raise ValueError(f"PrefetchEngine: mode='zero_copy' needs a pinned bank; bank of shape "
                             f"{list(bank.shape)} is pageable (use bank.pin_memory())")
        if not first and (tuple(bank.shape[1:]) != self._row_shape or bank.dtype != self._dtype):
            raise ValueError(f"PrefetchEngine.set_bank: rows must stay {list(self._row_shape)} {self._dtype}, got "
                             f"bank of shape {list(bank.shape)} {bank.dtype}")

    def set_bank(self, bank: torch.Tensor) -> None:
        """Serve later requests from `bank` (e.g. after rows were appended). Returns once no earlier
        request still reads the previous bank, which the caller may then modify or free."""
        self._check_bank(bank)
        with self._lock:
            self._bank = bank
            earlier = list(self._inflight)
        for handle in earlier:  # host reads end with the worker's part; zero-copy kernels at their event
            if self.mode == "zero_copy":
                handle._finish()
            else:
                concurrent.futures.wait([handle._future])
        self._worker.release_retained()

    def drain(self) -> None:
        """Wait until every request made so far has completed, device work included."""
        with self._lock:
            earlier = list(self._inflight)
        for handle in earlier:
            handle._finish()
        self._worker.release_retained()
        with self._lock:
            self._purge()

    # -- requests ---------------------------------------------------------------------------
    def _purge(self) -> None:
        while self._inflight and self._inflight[0].done():
            self._inflight.popleft()

    def in_flight(self) -> int:
        with self._lock:
            self._purge()
            return len(self._inflight)

    def pinned_bytes(self) -> int:
        """Bytes of pinned host memory the engine holds for staging (0 on CPU and in zero-copy mode)."""
        staging = self._worker.staging
        return staging.nbytes() if staging is not None else 0

    def request(self, index: torch.Tensor, out: torch.Tensor | None = None) -> PrefetchHandle:
        """Queue a gather of `bank[index]` (index int64 (R,) or (B, R)); returns immediately.

        The index is validated before anything is queued (TypeError for a non-int64 index,
        ValueError for bad dims or more than `max_rows` rows, IndexError for a value outside
        [0, M)) and copied, so the caller may reuse its tensor at once.
        `out` (optional): a preallocated contiguous destination (*index.shape, *row) on `device`,
        e.g. a static buffer; it is written after the work already queued on the caller's
        current stream, and must not be touched until `wait()` returns it. Without it, a new
        tensor is allocated (on CPU the allocation's page faults can cost more than the gather)."""
        if self._closed:
            raise RuntimeError("PrefetchEngine.request: the engine is closed")
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"PrefetchEngine.request: index must be a torch.Tensor, got {type(index).__name__}")
        index = index.cpu()  # a CUDA index synchronises here (the host gather needs it anyway)
        with self._lock:
            bank = self._bank
            check_index(bank, index)
            if index.numel() > self.max_rows:
                raise ValueError(f"PrefetchEngine.request: index of shape {list(index.shape)} asks for "
                                 f"{index.numel()} rows, more than max_rows={self.max_rows}")
            if self.mode == "zero_copy":  # the kernel reads the index through its mapped pointer
                private = self._rt.pinned(index.shape, index.dtype)
            else:
                private = torch.empty(index.shape, dtype=index.dtype)
            private.copy_(index)
            ready = None
            if out is not None:
                self._check_out(out, bank, index)
                if self._rt is not None:
                    ready = self._rt.record_event(self._rt.current_stream())
            handle = PrefetchHandle((*index.shape, *self._row_shape), self._rt)
            self._purge()
            self._inflight.append(handle)
            self._worker.jobs.put((handle, bank, private, out, ready))
        return handle

    def _check_out(self, out: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> None:
        shape = [*index.shape, *self._row_shape]
        if list(out.shape) != shape or out.dtype != bank.dtype or out.device != self.device or not out.is_contiguous():
            raise ValueError(f"PrefetchEngine.request: out must be a contiguous {shape} {bank.dtype} on "
                             f"{self.device}, got {list(out.shape)} {out.dtype} on {out.device}"
                             f"{'' if out.is_contiguous() else ' (not contiguous)'}")

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Synchronous convenience: request(index).wait()."""
        return self.request(index).wait()

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the queued requests, stop and join the worker thread. Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "PrefetchEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

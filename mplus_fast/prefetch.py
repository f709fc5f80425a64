"""Asynchronous prefetch of rows of a CPU-resident bank (the long-term memory in low-memory mode).

    engine = PrefetchEngine(bank, device="cuda", num_staging=2, max_rows=2560)
    handle = engine.request(index)      # returns at once; index validated first (raises before any copy)
    ...                                 # overlap: projections, attention over [bos, STM, prompt]
    rows = handle.wait()                # (*index.shape, *row) on `device`, safe on the current stream

Design trade-off: staging + stream copy (mode="staged", the default) vs zero-copy (mode="zero_copy")
  * staged: a worker thread gathers the requested rows with the native multithreaded CPU gather
    (GIL released) into one of `num_staging` pinned staging buffers, then issues ONE bulk
    cudaMemcpyAsync (pinned -> device) on a dedicated copy stream and records an event. The bulk
    DMA runs at full PCIe bandwidth (~50 GB/s on H100) on the copy engine, uses no SM, and
    overlaps with compute on other streams. Costs: CPU memory bandwidth for the gather (the rows
    are read once and written once on the host), host threads, and `num_staging * max_rows` rows
    of pinned memory. A staging buffer is reused only after the event of the copy that last read
    it has completed (the worker synchronises on that event before gathering into it again), so
    up to `num_staging` copies are in flight while the next gather proceeds.
  * zero-copy: the GPU gather kernel reads the rows straight from the pinned bank through its
    mapped device pointer (csrc/kernels/gather.cuh). No staging memory, no host gather, one pass
    over PCIe; but the reads are SM-issued 16-byte transactions (lower achieved PCIe bandwidth than
    a DMA for large gathers) and the kernel occupies SMs while it waits on PCIe, competing with the
    compute it should hide behind. Good for small/scattered fetches or when host memory bandwidth
    or host cores are scarce; the bank must be pinned.
  On a CPU-only build/device the same API gathers with the native threaded kernel on the worker
  thread and returns a CPU tensor (no staging needed: the result is gathered straight into it).

Requests are served in FIFO order by one worker thread per engine (the gather itself is
multithreaded inside the op). Exceptions raised in the worker are re-raised by `handle.wait()`.
`close()` (or leaving the `with` block) drains pending requests and joins the thread; an engine
that is garbage-collected is closed too. `set_bank()` swaps the bank (e.g. after rows were
appended) and refuses while any request is in flight.
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

__all__ = ["PrefetchEngine", "PrefetchHandle"]

MODES = ("staged", "zero_copy")


def _gather_rows(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.ops.mplus_fast.gather_rows(bank, index)


def _gather_rows_out(bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    torch.ops.mplus_fast.gather_rows_out(bank, index, out)


class PrefetchHandle:
    """The pending result of `PrefetchEngine.request`."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._event: torch.cuda.Event | None = None  # set by the worker before the future resolves

    def done(self) -> bool:
        """Non-blocking: True once the rows are on the device (or the request failed)."""
        if not self._future.done():
            return False
        return self._event is None or self._future.exception() is not None or self._event.query()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The gathered rows, (*index.shape, *row). On CUDA, the caller's current stream is made
        to wait for the copy (no host synchronisation) and the tensor is recorded on it."""
        out = self._future.result(timeout)  # re-raises the worker's exception
        if self._event is not None:
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(self._event)
            out.record_stream(stream)
        return out

    result = wait


class _Worker:
    """Owns the thread, the queue, the staging buffers and the copy stream (not the engine, so an
    abandoned engine can be garbage-collected and its thread stopped)."""

    def __init__(self, device: torch.device, mode: str, staging: list[torch.Tensor]):
        self.device, self.mode, self.staging = device, mode, staging
        self.slot_events: list[torch.cuda.Event | None] = [None] * len(staging)
        self.next_slot = 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mplus-prefetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            handle, bank, index, out, ready = job
            try:
                out, event = self._execute(bank, index, out, ready)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                handle._future.set_exception(exc)
                event = exc = None
            else:
                handle._event = event
                handle._future.set_result(out)
            del job, handle, bank, index, out, ready  # hold no bank (or result) between requests

    def _execute(self, bank: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None, ready):
        if self.device.type != "cuda":
            if out is None:
                return _gather_rows(bank, index), None
            _gather_rows_out(bank, index, out)
            return out, None
        shape = (*index.shape, *bank.shape[1:])
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if out is None:
                out = torch.empty(shape, dtype=bank.dtype, device=self.device)
            else:
                self.stream.wait_event(ready)  # the caller's pending work on `out` comes first
                out.record_stream(self.stream)
            if self.mode == "zero_copy":
                # Host index (pinned) -> the CUDA kernel reads bank rows over PCIe into `out`.
                _gather_rows_out(bank, index, out)
            else:
                slot = self.next_slot
                self.next_slot = (slot + 1) % len(self.staging)
                if self.slot_events[slot] is not None:
                    self.slot_events[slot].synchronize()  # the copy that last read this buffer is done
                staging = self.staging[slot].reshape(-1)[: index.numel() * self.staging[slot][0].numel()].view(shape)
                _gather_rows_out(bank, index, staging)  # threaded host gather, GIL released
                out.copy_(staging, non_blocking=True)  # bulk DMA on the copy stream
            event = torch.cuda.Event()
            event.record(self.stream)
            if self.mode != "zero_copy":
                self.slot_events[slot] = event
        return out, event


class PrefetchEngine:
    """Gather rows of a CPU bank by index, asynchronously, onto `device` (see the module notes).

    bank:        (M, *row) CPU tensor, any dtype (pinned when CUDA is used; required for zero_copy).
    device:      where results go; default CUDA when available, else CPU.
    num_staging: pinned staging buffers (staged CUDA mode), i.e. copies that may be in flight
                 (unused on CPU and in zero_copy mode, where nothing is staged).
    max_rows:    the largest request (B * R rows) accepted; sizes the staging buffers.
    mode:        "staged" (gather on host + bulk copy) or "zero_copy" (GPU kernel reads pinned bank).
    """

    def __init__(self, bank: torch.Tensor, device: torch.device | str | None = None, num_staging: int = 2,
                 max_rows: int = 4096, mode: str = "staged"):
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if mode not in MODES:
            raise ValueError(f"PrefetchEngine: mode must be one of {MODES}, got {mode!r}")
        if mode == "zero_copy" and device.type != "cuda":
            raise ValueError(f"PrefetchEngine: mode='zero_copy' needs a CUDA device, got {device}")
        if num_staging < 1:
            raise ValueError(f"PrefetchEngine: num_staging must be >= 1, got {num_staging}")
        if max_rows < 1:
            raise ValueError(f"PrefetchEngine: max_rows must be >= 1, got {max_rows}")
        self.device, self.mode, self.max_rows = device, mode, int(max_rows)
        self._check_bank(bank, first=True)
        self._bank = bank
        self._row_shape, self._dtype = tuple(bank.shape[1:]), bank.dtype
        staging = []
        if device.type == "cuda" and mode == "staged":
            staging = [torch.empty((self.max_rows, *self._row_shape), dtype=bank.dtype, pin_memory=True)
                       for _ in range(num_staging)]
        self._lock = threading.Lock()
        self._inflight: collections.deque[PrefetchHandle] = collections.deque()
        self._closed = False
        self._worker = _Worker(device, mode, staging)
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
        if self.mode == "zero_copy" and not bank.is_pinned():
            raise ValueError(f"PrefetchEngine: mode='zero_copy' needs a pinned bank; bank of shape "
                             f"{list(bank.shape)} is pageable (use bank.pin_memory())")
        if not first and (tuple(bank.shape[1:]) != self._row_shape or bank.dtype != self._dtype):
            raise ValueError(f"PrefetchEngine.set_bank: rows must stay {list(self._row_shape)} {self._dtype}, got "
                             f"bank of shape {list(bank.shape)} {bank.dtype}")

    def set_bank(self, bank: torch.Tensor) -> None:
        """Swap the bank (e.g. after appending rows). Raises RuntimeError if a request is in flight."""
        self._check_bank(bank)
        with self._lock:
            self._purge()
            if self._inflight:
                raise RuntimeError(f"PrefetchEngine.set_bank: {len(self._inflight)} request(s) still in flight; "
                                   "wait for them first")
            self._bank = bank

    # -- requests ---------------------------------------------------------------------------
    def _purge(self) -> None:
        while self._inflight and self._inflight[0].done():
            self._inflight.popleft()

    def in_flight(self) -> int:
        with self._lock:
            self._purge()
            return len(self._inflight)

    def request(self, index: torch.Tensor, out: torch.Tensor | None = None) -> PrefetchHandle:
        """Queue a gather of `bank[index]` (index int64 (R,) or (B, R)); returns immediately.

        The index is validated before anything is queued (TypeError for a non-int64 index,
        ValueError for bad dims or more than `max_rows` rows, IndexError for a value outside
        [0, M)) and copied, so the caller may reuse its tensor at once.
        `out` (optional): a preallocated destination (*index.shape, *row) on `device`, e.g. a
        static buffer; it is written after the work already queued on the caller's current
        stream, and must not be touched until `wait()` returns it. Without it, a new tensor is
        allocated (on CPU the allocation's page faults can cost more than the gather itself)."""
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
            private = torch.empty(index.shape, dtype=index.dtype, pin_memory=self.mode == "zero_copy")
            private.copy_(index)
            ready = None
            if out is not None:
                self._check_out(out, bank, index)
                if out.is_cuda:
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(out.device))
            handle = PrefetchHandle((*index.shape, *self._row_shape))
            self._purge()
            self._inflight.append(handle)
            self._worker.jobs.put((handle, bank, private, out, ready))
        return handle

    def _check_out(self, out: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> None:
        shape = [*index.shape, *self._row_shape]
        if list(out.shape) != shape or out.dtype != bank.dtype or out.device != self.device:
            raise ValueError(f"PrefetchEngine.request: out must be {shape} {bank.dtype} on {self.device}, got "
                             f"{list(out.shape)} {out.dtype} on {out.device}")

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

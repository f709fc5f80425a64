"""One worker thread runs everything that touches the model, in arrival order.

The model is one set of weights and buffers with one memory attached at a time, so compute is
serialised: an injection into a memory never overlaps a read of it, and switching memories
happens between requests, never inside one. The HTTP side (parsing, validation, streaming the
answers out) stays concurrent on the event loop. The queue is bounded: a request that finds
`max_queue` requests already waiting is answered 429 at once; one that waited longer than
`queue_timeout_s` before starting is answered 503 without running.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from mplus_fast.serve.errors import busy, timed_out


class Deadline:
    """A request's time limit, checked between tokens and between injected chunks."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise RequestTimeout(f"the request ran past its time limit of {self.seconds:g} s and was stopped; "
                                 "ask for fewer tokens or a shorter input")


class RequestTimeout(Exception):
    pass


class ModelWorker:
    def __init__(self, max_queue: int = 16, queue_timeout_s: float = 60.0):
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mplus-model")
        self.in_flight = 0          # running + waiting; touched only on the event loop

    async def run(self, fn, *args):
        return await self.submit(fn, *args)

    def submit(self, fn, *args) -> asyncio.Future:
        """Queue `fn(*args)` for the worker thread (call on the event loop). Raises the 429 error at
        once when the queue is full; the returned future holds the result or the error."""
        if self.in_flight >= self.max_queue + 1:
            raise busy(f"the server is busy: {self.in_flight - 1} requests are waiting (limit {self.max_queue}); retry later")
        self.in_flight += 1
        submitted = time.monotonic()

        def job():
            waited = time.monotonic() - submitted
            if waited > self.queue_timeout_s:
                raise timed_out(f"the request waited {waited:.0f} s in the queue (limit {self.queue_timeout_s:g} s) "
                                "and was not run; retry later", status=503)
            return fn(*args)
        future = asyncio.wrap_future(self.executor.submit(job))
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        self.in_flight -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

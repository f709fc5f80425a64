"""What a model used from several threads guarantees (docs/reliability.md, "Threads").

One `MPlus` is one memory plus caches that every call reads and most calls change: the fast
backend's cached K/V and rotated prefixes, the static decoder's buffers (and CUDA graph), the
prefetch engine's staging buffers, the dynamic-RoPE state and the random generator. So the calls
on one model are serialised: each public call holds the model's gate for its whole duration (a
`generate` until its last token), and a call from another thread waits for it. A caller thus
always sees a whole memory: a read never observes half an update, a save never writes one.
Different models share nothing and run in parallel (torch releases the GIL in its kernels).

A call made from inside another call on the same thread (a streamer's `put`, or any callback,
calling back into the model) may only look: `state`, `state_tensors`, `snapshot`, `memory_stats`,
`save_pretrained`, `save_memory`. Anything that reads with the caches or changes the memory
(`forward`, `generate`, `inject_memory`, `restore`, `reset`, `load_memory`) raises
`NestedCallError` instead of corrupting the call in progress or deadlocking.
"""
from __future__ import annotations

import contextlib
import functools
import threading


class NestedCallError(RuntimeError):
    """A model call that reads or changes the memory, made from inside another call on the same thread."""


class ModelGate:
    """One call at a time per model; same-thread nesting only for calls that merely look."""

    def __init__(self):
        self._lock = threading.RLock()
        self._active: list[str] = []   # the calls running on the holding thread, outermost first

    @contextlib.contextmanager
    def call(self, name: str, nestable: bool):
        with self._lock:
            if self._active and not nestable:
                raise NestedCallError(
                    f"MPlus.{name} was called from inside MPlus.{self._active[0]} on the same thread (from a streamer "
                    f"or a callback?): only state, state_tensors, snapshot, memory_stats, save_pretrained and "
                    f"save_memory may be called there; call {name} after {self._active[0]} returns")
            self._active.append(name)
            try:
                yield
            finally:
                self._active.pop()

    @property
    def busy(self) -> bool:
        """Whether a call holds the gate (on any thread); a hint, stale as soon as it is read."""
        if self._lock.acquire(blocking=False):
            busy = bool(self._active)
            self._lock.release()
            return busy
        return True


def serialised(nestable: bool = False):
    """Run the decorated MPlus method under the model's gate (see the module docstring)."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with self._gate.call(method.__name__, nestable):
                return method(self, *args, **kwargs)
        return wrapper
    return decorate

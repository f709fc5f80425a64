"""Backends do the arithmetic behind `MPlus`, as compute over one memory store (mplus_fast/store.py).

| name | what |
| --- | --- |
| reference | the authors' computation in plain PyTorch (parity truth): K/V recomputed from hidden rows |
| fast | K/V cached as a store column, fused projections, native ops (module map in backends/fast.py) |
"""
from __future__ import annotations

BACKENDS = ("reference", "fast")


def make_backend(name: str, model, state):
    if name == "reference":
        from mplus_fast.backends.reference import ReferenceBackend
        return ReferenceBackend(model, state)
    if name == "fast":
        from mplus_fast.backends.fast import FastBackend
        return FastBackend(model, state)
    raise ValueError(f"backend={name!r} is not available (choose from {list(BACKENDS)})")

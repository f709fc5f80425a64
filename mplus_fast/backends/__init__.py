"""Backends do the arithmetic behind `MPlus`; they own the memory in their own layout.

| name | what |
| --- | --- |
| reference | the authors' computation in plain PyTorch (parity truth) |
| fast | memory kept as cached keys/values, slotted STM, growable LTM bank, native ops |
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

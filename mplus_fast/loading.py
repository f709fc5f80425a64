"""Where each checkpoint tensor lives once loaded, and in which dtype: the one rule the streaming
loader (`checkpoint.read_tensors(convert=...)`) and `MPlus.__init__` share.

A checkpoint is read tensor by tensor, and each tensor is converted as soon as it is read, so its
float32 source is released before the next one is read (peak host memory: what the model keeps
plus one tensor). The rule, for a model computing on `device` in `dtype`:
- weights (every name of `weights.expected_weight_shapes`) take the compute dtype and go to
  `device`, except, with the fast backend on a GPU, the base weights of the LoRA-adapted
  projections: the fast backend computes with merged copies and keeps these originals only to
  save the upstream layout, in host memory; they are loaded there directly (and marked to be
  merged on `device`, one projection at a time: `Weights.merge_adapted_on`), never staged
  through the GPU;
- the memory's rows (`memory`, `ltm.i`, `ltm_keys.i`, `cached_dropped_memories.i`,
  `cached_dropped_keys.i`) take the compute dtype and stay on the host: the memory state copies
  each to where the backend keeps it (the LTM hidden states of the fast backend stay on the
  host; its bank K/V are computed from them), so none is staged through the GPU;
- everything else (ages, recall frequencies, provenance, counters, generator and RoPE state) is
  small and exact: kept as read, on the host; the memory state converts it where it is used.

What the loader read is handed to the model as `Streamed` tensors: nobody else holds them, so the
model keeps each as it is (the weights, and the memory's rows: the memory store takes a row tensor
already in its column's dtype and device as that column's buffer, `store.HandedOverState`),
instead of copying it while the loaded dict still holds the original. Peak host memory while
loading: what the loaded model keeps plus the tensor in flight (`tests/test_streaming_load.py`
measures it), and at most one bank chunk of derived K/V arithmetic (`store.CHUNK_ROWS`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mplus_fast.config import MPlusConfig
from mplus_fast.weights import expected_weight_shapes

HOST = torch.device("cpu")
_MEMORY_ROWS = re.compile(r"(memory|ltm\.\d+|ltm_keys\.\d+|cached_dropped_memories\.\d+|cached_dropped_keys\.\d+)")


class Streamed(dict):
    """Tensors the streaming loader made, each already in its place (`Placement.convert`) and held
    by nobody else: the model built from them keeps them as they are, memory rows included."""


@dataclass(frozen=True)
class Placement:
    """The dtype and device of every tensor of one model's checkpoint (see the module notes)."""
    config: MPlusConfig
    device: torch.device
    dtype: torch.dtype
    backend: str = "fast"

    def __post_init__(self):
        object.__setattr__(self, "_weights", frozenset(expected_weight_shapes(self.config)))
        object.__setattr__(self, "_host_originals", frozenset(self._adapted_base_weights()))

    def _adapted_base_weights(self) -> list[str]:
        if self.backend != "fast" or self.device.type == "cpu":
            return []
        return [n for n in self._weights if n.endswith(".base_layer.weight")]   # only adapted projections have one

    def originals_on_host(self) -> bool:
        """Whether the adapted projections' base weights wait in host memory (merged on `device`)."""
        return bool(self._host_originals)

    def where(self, name: str, tensor: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) the tensor `name` takes in the loaded model."""
        if name in self._host_originals:
            return HOST, self.dtype
        if name in self._weights:
            return self.device, self.dtype
        if _MEMORY_ROWS.fullmatch(name) and tensor.dtype.is_floating_point:
            return HOST, self.dtype
        return HOST, tensor.dtype

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in its place (the same tensor when it is already there: no copy)."""
        device, dtype = self.where(name, tensor)
        return tensor.to(device=device, dtype=dtype)

    def convert_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new dict of every tensor in its place (the caller's dict is left as it is)."""
        return {name: self.convert(name, t) for name, t in tensors.items()}


# ---------------------------------------------------------------------- presets
# Named sets of load options. "low-memory", for a 24 GB GPU: the LTM bank (K/V rows and hidden
# states) in host memory, prefetched per prompt; bfloat16. Its device budget at the released
# geometry is computed by `mplus_fast.budget` (docs/memory_budget.md).
PRESETS: dict[str, dict] = {
    "low-memory": {"ltm_placement": "host", "dtype": torch.bfloat16},
}


def apply_preset(preset: str | None, **options) -> dict:
    """`options` (load's keyword arguments, None where not given) with the preset's values filled
    in; an option given explicitly that contradicts the preset is refused, naming both."""
    if preset is None:
        return options
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {list(PRESETS)}")
    out = dict(options)
    for key, value in PRESETS[preset].items():
        given = out.get(key)
        if given is not None and not _same_option(given, value):
            raise ValueError(f"preset={preset!r} sets {key}={value!r}, but {key}={given!r} was given: drop one")
        out[key] = value
    return out


def _same_option(given, value) -> bool:
    if isinstance(value, torch.dtype) and isinstance(given, str):
        return given.removeprefix("torch.") == str(value).removeprefix("torch.")
    return given == value

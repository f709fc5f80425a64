"""Memories as objects: one set of loaded weights, many memories (SPEC §2 state), each one
snapshotted, restored, forked, reset, saved and loaded apart from the weights.

A `Memory` is everything that an injection changes and a read depends on, detached from the
model, on the CPU: the STM (hidden states, ages, provenance, slot layout), the LTM bank and the
pending buffer (hidden states, retrieval keys, ages, recall frequencies, provenance), the update
counter, the injection counter, MemoryLLM's `initialized` flag, and the generator state (which
STM tokens the next injection drops). The tensors carry the checkpoint names of SPEC §8
(`memory`, `ltm.{i}`, ..., `mplus_fast.*`), so a memory file is a checkpoint without its weights.

Model side (thin methods on `MPlus`, all here):
  `model.snapshot()`            a Memory copy of the current memory (the model keeps running on its own);
  `model.restore(memory)`       make `memory` the model's memory (the weights stay; the fast backend
                                takes the cached K/V a snapshot of this same model carries, else
                                recomputes them from the memory's hidden states);
  `model.reset()`               back to the memory of the checkpoint the model was loaded from;
  `model.save_memory(path)`     write the current memory (one file, atomic), weights untouched;
  `model.load_memory(path)`     read a memory file and restore it;
  `memory.fork()`               an independent copy (a what-if branch: inject into one, keep the other).
A memory carries a fingerprint of the model config it belongs to (`config_fingerprint`); restoring
or loading a memory of another model geometry is refused with both configurations named.

On disk (`write_memory` / `read_memory`): a safetensors file (`*.safetensors`, or a folder, which
then holds `memory.safetensors`), written through `mplus_fast.atomic.commit_files`: a crash at any
instant leaves the previous file or the new one, never a mix; nothing else in the folder changes.
Its metadata holds the fingerprint, the config summary, the dtype and the writer.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from mplus_fast.atomic import recover
from mplus_fast.checkpoint import OURS, CheckpointError, commit_or_explain, save_safetensors
from mplus_fast.checkpoint_checks import check_tensors, saved_checksums
from mplus_fast.safetensors_header import HeaderError, read_header

MEMORY_FILE = "memory.safetensors"
KIND = "mplus_fast.memory"
FORMAT_VERSION = "1"
# Config fields that do not change what a memory means (so a memory moves between them).
NOT_FINGERPRINTED = {"torch_dtype", "transformers_version", "_name_or_path", "bos_token_id", "eos_token_id",
                     "pad_token_id", "use_cache", "auto_map", "max_position_embeddings", "output_attentions",
                     "output_hidden_states", "return_dict"}
MODEL_STATE = (f"{OURS}rope_inv_freq", f"{OURS}rope_cached_len")   # the model's, not a memory's


class MemoryMismatchError(ValueError):
    """A memory made by another model (its config fingerprint differs)."""


def config_fingerprint(config) -> str:
    """sha256 over the config fields that fix the memory's layout and meaning (16 hex digits)."""
    raw = {k: v for k, v in config.to_dict().items() if k not in NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensors_key(tensors: dict[str, torch.Tensor]) -> dict | None:
    """The tensors themselves (held, so no other tensor can take their place) with their in-place
    version counters: `same_tensors` is true only while none is replaced or modified. None when one
    is an inference tensor (made under torch.inference_mode: it keeps no version counter)."""
    if any(t.is_inference() for t in tensors.values()):
        return None
    return {name: (t, t._version) for name, t in tensors.items()}


def same_tensors(key: dict | None, tensors: dict[str, torch.Tensor]) -> bool:
    return (key is not None and key.keys() == tensors.keys()
            and all(tensors[n] is t and t._version == v for n, (t, v) in key.items()))


def config_summary(config) -> str:
    return (f"{config.architecture}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"T={config.num_tokens}, STM {config.stm_size}, R={config.ltm_retrieved}, vocab {config.vocab_size}")


@dataclass
class Memory:
    tensors: dict[str, torch.Tensor]   # checkpoint names → CPU tensors
    fingerprint: str
    summary: str = ""
    meta: dict = field(default_factory=dict)
    # What a backend derived from the rows (the fast backend's K/V, `MemoryStore.derived_rows`),
    # valid only for the model instance whose `derived_tag` it carries; never written to disk.
    derived: dict[str, torch.Tensor] | None = None
    derived_tag: str | None = None
    derived_of: dict | None = None       # `tensors_key(tensors)` the derived columns were made from

    def fork(self) -> "Memory":
        """An independent deep copy."""
        tensors = {k: v.clone() for k, v in self.tensors.items()}
        if not self.derived_valid_for(self.derived_tag):
            return Memory(tensors, self.fingerprint, self.summary, dict(self.meta))
        return Memory(tensors, self.fingerprint, self.summary, dict(self.meta),
                      {k: v.clone() for k, v in self.derived.items()}, self.derived_tag, tensors_key(tensors))

    def derived_valid_for(self, tag: str | None) -> bool:
        """Whether the derived columns belong to the model tagged `tag` and to these very tensors,
        unchanged since (a tensor replaced or edited in place makes them stale: recomputed then)."""
        return (self.derived is not None and tag is not None and self.derived_tag == tag
                and same_tensors(self.derived_of, self.tensors))

    clone = fork

    @property
    def derived_nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.derived or {}).values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def stats(self) -> dict:
        """Sizes of this memory: tokens per part and bytes."""
        t = self.tensors
        layers = t["memory"].shape[0]
        ltm = [t[f"ltm.{i}"].shape[0] for i in range(layers)] if "ltm.0" in t else []
        pend = t["cached_dropped_memories.0"].shape[0] if "cached_dropped_memories.0" in t else 0
        return {"layers": layers, "stm_tokens_per_layer": t["memory"].shape[1], "ltm_tokens_per_layer": ltm,
                "pending_tokens": pend, "update_step": int(t.get("update_step", torch.tensor(0))),
                "injections": int(t.get(f"{OURS}next_injection_id", torch.tensor(0))), "bytes": self.nbytes,
                "dtype": str(t["memory"].dtype).replace("torch.", ""),
                "derived_bytes": self.derived_nbytes}


# ---------------------------------------------------------------------- model side
def snapshot(model) -> Memory:
    weights = set(model.weights.to_tensors(model.config))
    with torch.inference_mode(False):    # ordinary tensors, even when taken inside a generate's callback
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in model.state_tensors().items()
                   if k not in weights and k not in MODEL_STATE}
    memory = Memory(tensors, config_fingerprint(model.config), config_summary(model.config), {"snapshot_at": time.time()})
    export = getattr(model.backend, "derived_rows", None)
    if export is not None:
        memory.derived, memory.derived_tag, memory.derived_of = export(), model.derived_tag, tensors_key(tensors)
    return memory


def check_compatible(model, memory: Memory) -> None:
    want = config_fingerprint(model.config)
    if memory.fingerprint != want:
        raise MemoryMismatchError(
            f"this memory belongs to another model (config fingerprint {memory.fingerprint}: "
            f"{memory.summary or 'unknown'}); the loaded model is {want}: {config_summary(model.config)}")


def restore(model, memory: Memory) -> None:
    """Make `memory` the model's memory. Everything is checked and built before the model is
    touched, so a refused memory leaves the current one as it was."""
    if not isinstance(memory, Memory):
        raise TypeError(f"restore: expected a mplus_fast.memories.Memory, got {type(memory).__name__}")
    check_compatible(model, memory)
    t = memory.tensors
    check_memory_tensors(model.config, t)
    state = model._state_from_tensors(t)
    gen = t.get(f"{OURS}generator_state")
    attach_state(model, state, memory.derived if memory.derived_valid_for(model.derived_tag) else None)
    if gen is not None:
        model.generator.set_state(gen.to(torch.uint8))
    model.last_update = None


def check_memory_tensors(config, t: dict[str, torch.Tensor]) -> None:
    """The checkpoint's own checks (mplus_fast.checkpoint_checks), on the memory part only: names,
    shapes and dtype kinds against the config, no NaN/Inf, a consistent state."""
    from mplus_fast.checkpoint_checks import KIND_DTYPES, check_state, check_tensors, expected_layout
    from mplus_fast.weights import expected_weight_shapes
    weights = set(expected_weight_shapes(config))
    layout = {k: v for k, v in expected_layout(config, {k: tuple(v.shape) for k, v in t.items()}).items()
              if k not in weights and k not in MODEL_STATE}
    missing = [k for k, spec in layout.items() if spec.required and k not in t]
    if missing:
        raise CheckpointError(f"memory is missing tensor(s) {missing[:5]}")
    for name, tensor in t.items():
        spec = layout.get(name)
        if spec is None:
            raise CheckpointError(f"memory has unexpected tensor {name!r} {tuple(tensor.shape)}")
        if len(spec.shape) != tensor.dim() or any(w >= 0 and w != g for w, g in zip(spec.shape, tensor.shape)):
            raise CheckpointError(f"memory tensor {name!r} has shape {tuple(tensor.shape)}, expected {spec.shape}")
        if tensor.dtype not in KIND_DTYPES[spec.kind]:
            raise CheckpointError(f"memory tensor {name!r} has dtype {tensor.dtype}")
    check_tensors(t)
    check_state(config, t)


def attach_state(model, state, derived: dict[str, torch.Tensor] | None = None) -> None:
    """Give the backend a new memory state, keeping its weights (the fast backend rebuilds its
    cached K/V from the state's hidden rows, or takes `derived`, its own K/V of these rows)."""
    backend = model.backend
    if derived is not None:
        backend.load_state(state, derived)
    elif hasattr(backend, "load_state"):
        backend.load_state(state)       # copies into its own buffers
    else:
        backend.state = state.clone()   # the memory object stays independent of the model


def reset(model) -> None:
    """Back to the memory of the checkpoint the model was loaded from (read again from its files)."""
    source = getattr(model, "source", None)
    if source is None:
        raise ValueError("reset: this model was not loaded from a checkpoint folder, so there is no memory to reset to; "
                         "take a model.snapshot() first and restore(...) it instead")
    restore(model, read_checkpoint_memory(model, source))


def read_checkpoint_memory(model, folder: Path) -> Memory:
    from mplus_fast.checkpoint import _files
    weights = set(model.weights.to_tensors(model.config))
    tensors = {}
    for f in _files(Path(folder))[0]:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                if name not in weights and name not in MODEL_STATE:
                    tensors[name] = h.get_tensor(name)
    memory = Memory(tensors, config_fingerprint(model.config), config_summary(model.config), {"from": str(folder)})
    if "memory" not in tensors:
        raise CheckpointError(f"{folder}: the checkpoint has no memory tensors")
    return memory


# ---------------------------------------------------------------------- files
def _target(path: str | Path) -> tuple[Path, str]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p.parent, p.name
    return p, MEMORY_FILE


def write_memory(path: str | Path, memory: Memory, extra_files: dict[str, str] | None = None) -> Path:
    """Write `memory` to `path` (a .safetensors file, or a folder: `memory.safetensors` in it) as one
    crash-safe commit, with `extra_files` (name → text) beside it in the same commit."""
    folder, name = _target(path)
    meta = {"format": "pt", "writer": "mplus_fast", "kind": KIND, "version": FORMAT_VERSION,
            "fingerprint": memory.fingerprint, "config": memory.summary,
            "meta": json.dumps(memory.meta, default=str)}
    tensors = {k: v.contiguous() for k, v in memory.tensors.items()}
    files = {name: lambda p: save_safetensors(tensors, p, meta)}   # with CRC-32s; a full disk is an OSError
    for fname, text in (extra_files or {}).items():
        files[fname] = lambda p, t=text: p.write_text(t)
    commit_or_explain(folder, files, what="memory file")
    return folder / name


def read_memory(path: str | Path) -> Memory:
    """A memory file written by `write_memory` (refuses a checkpoint or another file, naming it)."""
    folder, name = _target(path)
    f = folder / name
    if folder.is_dir():
        recover(folder)       # an interrupted write: complete or discard it first
    if not f.is_file():
        raise FileNotFoundError(f"memory file not found: {f}")
    try:
        header = read_header(f)      # checked against the file before anything is read
    except HeaderError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            if meta.get("kind") != KIND:
                raise CheckpointError(f"{f} is not a mplus_fast memory file (no kind={KIND!r} in its metadata); "
                                      "a checkpoint is loaded with mplus_fast.load")
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        check_tensors(tensors, {k: f for k in tensors}, saved_checksums(header))   # CRC-32s, finite values
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CheckpointError(f"{f}: unreadable memory file ({str(exc).splitlines()[0][:200]})") from None
    try:
        extra = json.loads(meta.get("meta", "{}"))
    except ValueError:
        extra = {}
    return Memory(tensors, meta.get("fingerprint", ""), meta.get("config", ""), extra)

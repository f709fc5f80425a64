"""Checkpoint I/O in the upstream Hugging Face layout (SPEC §8).

Reading: `config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`; every
tensor checked against the config (missing, unexpected, wrong shape → one CheckpointError naming
it). Writing: the same layout, plus the extra state that lets a reload continue exactly
(pending buffer, ages, update step; provenance, generator and RoPE state under `mplus_fast.`),
written atomically: into a temporary sibling directory that replaces the target only once
complete, so a crash or a full disk never leaves a half-written checkpoint and never loses the
previous one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mplus_fast.config import MPlusConfig
from mplus_fast.weights import expected_weight_shapes

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
OURS = "mplus_fast."
# Upstream memory-state names (per layer i where marked with {i}).
LTM_KEYS = ("ltm.{i}", "ltm_keys.{i}", "ltm_ages.{i}", "ltm_recall_frequencies.{i}")
PENDING_KEYS = ("cached_dropped_memories.{i}", "cached_dropped_keys.{i}", "cached_dropped_memory_ages.{i}")
OPTIONAL_GLOBAL = ("update_step", "initialized")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (the message names the tensor or file)."""


def _files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        index = json.loads((path / INDEX).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{path / INDEX}: empty weight_map")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {INDEX} are missing: {missing}")
        return [path / n for n in names]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX} found")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in _files(Path(path)):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                if name in tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard")
                tensors[name] = handle.get_tensor(name)
    return tensors


def load_checkpoint(path: str | Path) -> tuple[MPlusConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a Hugging Face style checkpoint folder)")
    config = MPlusConfig.from_file(path / "config.json")
    tensors = read_tensors(path)
    validate_tensors(config, tensors)
    return config, tensors


def memory_shapes(config: MPlusConfig, t: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes the memory-state tensors of this checkpoint must have (LTM sizes read from `ltm.{i}`)."""
    L, d, s = config.num_hidden_layers, config.hidden_size, config.selector_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"memory": (L, config.stm_size, d)}
    if not config.is_mplus:
        return shapes
    for i in range(L):
        if f"ltm.{i}" not in t:
            raise CheckpointError(f"checkpoint is missing tensor 'ltm.{i}' (M+ long-term memory of layer {i})")
        n = t[f"ltm.{i}"].shape[0]
        shapes.update({f"ltm.{i}": (n, d), f"ltm_keys.{i}": (n, s), f"ltm_ages.{i}": (n,), f"ltm_recall_frequencies.{i}": (n,)})
    return shapes


def optional_shapes(config: MPlusConfig, t: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    L, d, s, N = config.num_hidden_layers, config.hidden_size, config.selector_hidden_dim, config.stm_size
    shapes: dict[str, tuple[int, ...]] = {"update_step": (), "initialized": ()}
    for i in range(L):
        shapes[f"memory_ages.{i}"] = (N,)
        if config.is_mplus:
            c = t[f"cached_dropped_memories.{i}"].shape[0] if f"cached_dropped_memories.{i}" in t else 0
            shapes.update({f"cached_dropped_memories.{i}": (c, d), f"cached_dropped_keys.{i}": (c, s),
                           f"cached_dropped_memory_ages.{i}": (c,)})
    return shapes


def validate_tensors(config: MPlusConfig, t: dict[str, torch.Tensor]) -> None:
    required = {**expected_weight_shapes(config), **memory_shapes(config, t)}
    optional = optional_shapes(config, t)
    missing = [k for k in required if k not in t]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:5]}{more} required by its config.json")
    for name, tensor in t.items():
        if name.startswith(OURS):
            continue
        want = required.get(name, optional.get(name))
        if want is None:
            raise CheckpointError(f"checkpoint has unexpected tensor {name!r} {tuple(tensor.shape)} for a "
                                  f"{config.architecture} config with {config.num_hidden_layers} layers")
        if tuple(tensor.shape) != tuple(want):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(want)} from config.json")
    if config.is_mplus:
        pend = {t[f"cached_dropped_memories.{i}"].shape[0] if f"cached_dropped_memories.{i}" in t else 0 for i in range(config.num_hidden_layers)}
        if len(pend) > 1:
            raise CheckpointError(f"cached_dropped_memories.* have different lengths across layers: {sorted(pend)}")


# ---------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def write_checkpoint(path: str | Path, config: MPlusConfig, tensors: dict[str, torch.Tensor],
                     extra_files: dict[str, str] | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write atomically: build everything in a sibling temp dir, then swap it in."""
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"save target {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        shards = _shards(contiguous, max_shard_bytes)
        meta = {"format": "pt", "writer": "mplus_fast"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        else:
            weight_map = {}
            for j, shard in enumerate(shards):
                fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in contiguous.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        backup = None
        if target.exists():
            backup = target.parent / f".{target.name}.old-{os.getpid()}"
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(target, backup)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""Checkpoint I/O in the upstream Hugging Face layout (SPEC §8).

Reading: `config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`; every
tensor checked against the config (missing, unexpected, wrong shape → one CheckpointError naming
it). Writing: the same layout, plus the extra state that lets a reload continue exactly
(pending buffer, ages, update step; provenance, generator and RoPE state under `mplus_fast.`),
written as one crash-safe commit into the folder (`mplus_fast.atomic`): only the checkpoint's
own files change, the user's other files stay, and a crash or a full disk leaves the previous
checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mplus_fast.atomic import commit_files, recover
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
    recover(path)  # an interrupted save: complete it (or discard what it staged) before reading
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
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


class NotACheckpointError(CheckpointError):
    """A save would overwrite files that do not belong to an M+ / MemoryLLM checkpoint."""


def weight_files(folder: Path) -> set[str]:
    """The weight files of the checkpoint in `folder`: what a new save replaces or removes (the
    single file, the index, the shards named by the index or by the Hugging Face shard pattern)."""
    if not folder.is_dir():
        return set()
    names = {p.name for p in folder.iterdir() if p.is_file() and (p.name in (SINGLE, INDEX) or SHARD.fullmatch(p.name))}
    if INDEX in names:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            for shard in json.loads((folder / INDEX).read_text()).get("weight_map", {}).values():
                if isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard \
                        and (folder / shard).is_file():
                    names.add(shard)
    return names


def _foreign_files(folder: Path) -> list[str]:
    """Files a save would replace that are not an M+ / MemoryLLM checkpoint's own."""
    foreign = []
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            arch = json.loads(cfg.read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):
            arch = None
        if not (isinstance(arch, list) and len(arch) == 1 and arch[0] in ("MPlus", "MemoryLLM")):
            foreign.append("config.json")
    if foreign or not cfg.is_file():
        foreign += sorted(weight_files(folder))
    return foreign


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
                     extra_files: dict[str, str] | None = None, max_shard_bytes: int = 5 * 2**30,
                     overwrite: bool = False) -> Path:
    """Write the checkpoint files into the folder `path` as one crash-safe commit
    (`mplus_fast.atomic.commit_files`): config.json, the weights (one file, or an index and its
    shards) and `extra_files`; the previous checkpoint's weight files that are not rewritten are
    removed; every other file in the folder (a tokenizer, a README, the user's own files) is left
    alone. A folder whose config.json or weight files are not an M+ / MemoryLLM checkpoint's is
    refused unless `overwrite=True`."""
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"save target {target} exists and is not a directory")
    if target.is_dir() and not overwrite:
        recover(target)
        foreign = _foreign_files(target)
        if foreign:
            raise NotACheckpointError(
                f"{target} is not an M+ / MemoryLLM checkpoint folder: saving would replace {foreign}; "
                "choose another folder, or pass overwrite=True (CLI: --overwrite) to replace them")
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards = _shards(contiguous, max_shard_bytes)
    meta = {"format": "pt", "writer": "mplus_fast"}
    files: dict = {}
    if len(shards) == 1:
        files[SINGLE] = lambda p, s=shards[0]: save_file(s, str(p), metadata=meta)
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            files[fname] = lambda p, s=shard: save_file(s, str(p), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in contiguous.values())
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        files[INDEX] = lambda p: p.write_text(index)
    texts = {"config.json": json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", **(extra_files or {})}
    for name, text in texts.items():
        files[name] = lambda p, t=text: p.write_text(t)
    return commit_files(target, files, stale=weight_files)

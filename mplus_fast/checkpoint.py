"""Checkpoint I/O in the upstream Hugging Face layout (SPEC §8).

Reading treats the folder as untrusted: `config.json` (every field checked, `mplus_fast.config`)
+ `model.safetensors` or a sharded `model.safetensors.index.json` (shards confined to the folder);
the safetensors headers are checked against their files and the tensors' names, shapes and dtypes
against the config before anything is allocated; values (finite, valid state, saved CRC-32) as
they are read (`mplus_fast.checkpoint_checks`). Only safetensors is read: nothing is unpickled.
Every failure is one CheckpointError or ConfigError naming the file, field or tensor. Writing: the same layout, plus the extra state that lets a reload continue exactly
(pending buffer, ages, update step; provenance, generator and RoPE state under `mplus_fast.`),
written as one crash-safe commit into the folder (`mplus_fast.atomic`): only the checkpoint's
own files change, the user's other files stay, and a crash or a full disk leaves the previous
checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mplus_fast.atomic import commit_files, recover
from mplus_fast.checkpoint_checks import (CRC_KEY, OURS, CheckpointError, check_layout, check_state, check_tensors,
                                          checksums, saved_checksums)
from mplus_fast.config import TOKEN_ID_FIELDS, ConfigError, MPlusConfig, check_token_id_field
from mplus_fast.safetensors_header import Header, HeaderError, TensorInfo, read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 2**20   # an index of 100,000 tensors is a few MB
# Upstream memory-state names (per layer i where marked with {i}).
LTM_KEYS = ("ltm.{i}", "ltm_keys.{i}", "ltm_ages.{i}", "ltm_recall_frequencies.{i}")
PENDING_KEYS = ("cached_dropped_memories.{i}", "cached_dropped_keys.{i}", "cached_dropped_memory_ages.{i}")
OPTIONAL_GLOBAL = ("update_step", "initialized")
__all__ = ["CheckpointError", "NotACheckpointError", "load_checkpoint", "read_headers", "read_tensors", "write_checkpoint"]


# ---------------------------------------------------------------------- reading
def _index(path: Path) -> dict[str, str]:
    """The weight map of `path`'s index file: tensor name -> shard file name, each shard confined
    to the folder (a relative path with no '..', so an index from elsewhere cannot reach out)."""
    index_file = path / INDEX
    size = index_file.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index_file}: {size:,} bytes is not an index file (at most {MAX_INDEX_BYTES:,} are read)")
    try:
        index = json.loads(index_file.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index_file}: not valid JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
    if not weight_map:
        raise CheckpointError(f"{index_file}: empty weight_map")
    for shard in set(weight_map.values()):
        parts = PurePosixPath(shard).parts
        if (not parts or PurePosixPath(shard).is_absolute() or ".." in parts or "\\" in shard or ":" in shard
                or not shard.endswith(".safetensors")):
            raise CheckpointError(f"{index_file}: shard {shard!r} is not a .safetensors file inside the checkpoint "
                                  "folder (absolute paths and '..' are refused)")
    return weight_map


def _files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of the checkpoint in `path`, and the index's weight map (None: one file)."""
    if (path / INDEX).is_file():
        weight_map = _index(path)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard file(s) listed in {INDEX} are missing: {missing}")
        return [path / n for n in names], weight_map
    if (path / SINGLE).is_file():
        return [path / SINGLE], None
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX} found")


def read_headers(path: str | Path) -> tuple[dict[str, TensorInfo], dict[Path, Header]]:
    """Every tensor of the checkpoint folder `path`, as its header describes it (nothing is
    loaded), with each file's header. Each header is checked against its file, and the index
    against the shards; a tensor in two shards, or in another shard than the index says, is refused."""
    path = Path(path)
    files, weight_map = _files(path)
    infos: dict[str, TensorInfo] = {}
    headers: dict[Path, Header] = {}
    for f in files:
        try:
            header = read_header(f)
        except OSError as exc:
            raise CheckpointError(f"{f}: cannot be read ({exc.strerror or exc})") from None
        except HeaderError as exc:
            raise CheckpointError(str(exc)) from None
        headers[f] = header
        for name, info in header.tensors.items():
            if name in infos:
                raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard "
                                      f"({infos[name].file.name} and {f.name})")
            if weight_map is not None and weight_map.get(name) != f.name:
                where = f"in {weight_map[name]!r}" if name in weight_map else "nowhere"
                raise CheckpointError(f"{f}: holds tensor {name!r}, which {INDEX} places {where}")
            infos[name] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(infos))
        if absent:
            raise CheckpointError(f"{path / INDEX}: names tensor(s) {absent[:5]} that no shard holds")
    return infos, headers


def read_tensors(path: str | Path, infos: dict[str, TensorInfo] | None = None,
                 headers: dict[Path, Header] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint folder `path`, each checked as it is read (`check_tensors`:
    finite floats, the CRC-32 it was saved with). Pass what `read_headers` returned to read no
    header twice."""
    if infos is None or headers is None:
        infos, headers = read_headers(path)
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    crcs: dict[str, int] = {}
    for f, header in headers.items():
        crcs.update(saved_checksums(header))
        try:
            with safe_open(str(f), framework="pt") as handle:
                for name in header.tensors:
                    tensors[name] = handle.get_tensor(name)
                    files[name] = f
        except (SafetensorError, OSError) as exc:  # the file changed under us, or the disk failed
            raise CheckpointError(f"{f}: cannot be read ({exc})") from None
    check_tensors(tensors, files, {k: v for k, v in crcs.items() if k in tensors})
    return tensors


def load_checkpoint(path: str | Path) -> tuple[MPlusConfig, dict[str, torch.Tensor]]:
    """config.json and every tensor of a checkpoint folder, checked: the config's fields, then the
    tensors' names, shapes and dtypes from the headers (before any is read), then their values."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a Hugging Face style checkpoint folder)")
    recover(path)  # an interrupted save: complete it (or discard what it staged) before reading
    config = MPlusConfig.from_file(path / "config.json")
    infos, headers = read_headers(path)
    check_layout(config, infos)
    tensors = read_tensors(path, infos, headers)
    check_state(config, tensors)
    return config, tensors


GENERATION_CONFIG = "generation_config.json"


def read_generation_config(path: str | Path, config: MPlusConfig) -> dict | None:
    """`generation_config.json` of the folder, if there is one, with the token ids generation
    uses (eos, pad, bos) checked against the vocabulary; None when the folder has none."""
    f = Path(path) / GENERATION_CONFIG
    if not f.is_file():
        return None
    size = f.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise ConfigError(f"{f}: {size:,} bytes is not a generation config")
    try:
        gen = json.loads(f.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(gen, dict):
        raise ConfigError(f"{f}: must hold a JSON object, not {type(gen).__name__}")
    for key in TOKEN_ID_FIELDS:
        check_token_id_field(key, gen.get(key), config.vocab_size, where=str(f))
    return gen


def validate_tensors(config: MPlusConfig, t: dict[str, torch.Tensor]) -> None:
    """Tensors already in memory against a config: layout, values and state (as `load_checkpoint`)."""
    check_layout(config, t)
    check_tensors(t)
    check_state(config, t)


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

    def writer(shard):  # each file carries the CRC-32 of its tensors, checked at every load
        return lambda p: save_file(shard, str(p), metadata={**meta, CRC_KEY: checksums(shard)})

    files: dict = {}
    if len(shards) == 1:
        files[SINGLE] = writer(shards[0])
    else:
        weight_map = {}
        for j, shard in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            files[fname] = writer(shard)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in contiguous.values())
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        files[INDEX] = lambda p: p.write_text(index)
    texts = {"config.json": json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", **(extra_files or {})}
    for name, text in texts.items():
        files[name] = lambda p, t=text: p.write_text(t)
    return commit_files(target, files, stale=weight_files)

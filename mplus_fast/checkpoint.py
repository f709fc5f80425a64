"""Checkpoint I/O in the upstream Hugging Face layout (SPEC §8).

Reading treats the folder as untrusted: `config.json` (every field checked, `mplus_fast.config`)
+ `model.safetensors` or a sharded `model.safetensors.index.json` (shards confined to the folder);
the safetensors headers are checked against their files and the tensors' names, shapes and dtypes
against the config before anything is allocated; values (finite, valid state, saved CRC-32) as
they are read (`mplus_fast.checkpoint_checks`). Only safetensors is read: nothing is unpickled.
Tensors stream in one at a time, each converted to its place in the model (`mplus_fast.loading`)
before the next is read, so loading holds what the model keeps plus one tensor.
Every failure is one CheckpointError or ConfigError naming the file, field or tensor. Writing: the same layout, plus the extra state that lets a reload continue exactly
(pending buffer, ages, update step; provenance, generator and RoPE state under `mplus_fast.`),
written as one crash-safe commit into the folder (`mplus_fast.atomic`): only the checkpoint's
own files change, the user's other files stay, and a crash or a full disk leaves the previous
checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mplus_fast.atomic import JOURNAL, CommitError, commit_files, folder_lock, recover
from mplus_fast.checkpoint_checks import (OURS, CheckpointError, check_layout, check_state, check_tensor, check_tensors,
                                          checksum_metadata, saved_checksums)
from mplus_fast.config import TOKEN_ID_FIELDS, ConfigError, MPlusConfig, check_token_id_field, strict_json
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
        index = strict_json(index_file.read_bytes())
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


Convert = Callable[[str, torch.Tensor], torch.Tensor]


def read_tensor_data(handle: BinaryIO, header: Header, info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes, read from the open file `handle` straight into a tensor of its own
    (a positioned read: the file is never mapped whole, so its pages never count against the
    process, and the buffer is freed as soon as the tensor is)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        handle.seek(header.data_start + info.begin)
        got = handle.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:   # the header was checked against the file: it changed under us
            raise CheckpointError(f"{header.file}: tensor data ended after {got:,} of {info.nbytes:,} bytes "
                                  "(the file was truncated while it was read)")
    return buf.view(info.dtype).reshape(info.shape)


def read_tensors(path: str | Path, infos: dict[str, TensorInfo] | None = None,
                 headers: dict[Path, Header] | None = None, convert: Convert | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint folder `path`, streamed: each is read, checked
    (`check_tensor`: the CRC-32 it was saved with, finite floats), then handed to
    `convert(name, tensor)` (its dtype and device in the model, `mplus_fast.loading`) before the
    next one is read, so the source of each is released as soon as it is consumed: the peak is
    what is kept plus one tensor. Pass what `read_headers` returned to read no header twice."""
    if infos is None or headers is None:
        infos, headers = read_headers(path)
    tensors: dict[str, torch.Tensor] = {}
    # The checks of a tensor (CRC-32, finiteness: both release the GIL) run on a worker thread
    # while it is converted; its result is kept only once they pass.
    with ThreadPoolExecutor(max_workers=1) as checker:
        for f, header in headers.items():
            crcs = saved_checksums(header)
            try:
                with open(f, "rb") as handle:
                    for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].begin):   # one forward pass
                        t = read_tensor_data(handle, header, info)
                        checked = checker.submit(check_tensor, name, t, f, crcs.get(name))
                        converted = convert(name, t) if convert is not None else t
                        checked.result()
                        tensors[name] = converted
                        del t, converted
            except OSError as exc:  # the disk failed, or the file went away
                raise CheckpointError(f"{f}: cannot be read ({exc.strerror or exc})") from None
    return tensors


def load_checkpoint(path: str | Path, convert_for: Callable[[MPlusConfig], Convert] | None = None
                    ) -> tuple[MPlusConfig, dict[str, torch.Tensor]]:
    """config.json and every tensor of a checkpoint folder, checked: the config's fields, then the
    tensors' names, shapes and dtypes from the headers (before any is read), then their values as
    they stream in. `convert_for(config)` gives the conversion applied to each tensor as it is
    read (`read_tensors`; e.g. `loading.Placement(...).convert`); none: tensors as stored, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a Hugging Face style checkpoint folder)")
    recover(path)  # an interrupted save: complete it (or discard what it staged) before reading
    # The files are read one after another: a save into this folder commits before or after the
    # whole read, never between two of its files (saves take the folder's lock exclusively).
    with folder_lock(path, shared=True):
        config = MPlusConfig.from_file(path / "config.json")
        infos, headers = read_headers(path)
        check_layout(config, infos)
        tensors = read_tensors(path, infos, headers, convert_for(config) if convert_for is not None else None)
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
        gen = strict_json(f.read_bytes())
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


class SaveError(OSError):
    """A save that failed (full disk, read-only folder, I/O error); the message says what the
    folder now holds. Keeps the errno of the failure."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file with the CRC-32 of every tensor in the metadata (checked at every
    load), and its I/O failures raised as the OSError they are (it reports a full disk as a
    SafetensorError whose text holds the OS error number)."""
    metadata = {**metadata, **checksum_metadata(tensors)}
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from exc


def commit_or_explain(target: Path, files: dict, stale=(), what: str = "checkpoint") -> Path:
    """commit_files, with a failure (a SaveError) told in terms of what the folder holds afterwards."""
    try:
        return commit_files(target, files, stale=stale)
    except OSError as exc:
        if isinstance(exc, (SaveError, CommitError)):   # CommitError: an earlier save's, already explained
            raise
        why = exc.strerror or str(exc)
        if (target / JOURNAL).exists():   # past the commit point: the new checkpoint is decided
            state = ("the new checkpoint is committed but not yet in place: the next load or save of the folder "
                     "finishes it")
        else:
            kept = any((target / name).exists() for name in files)
            state = f"the {what} that was there is unchanged" if kept else "nothing was saved"
        raise SaveError(exc.errno, f"saving to {target} failed: {why}; {state}") from exc


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
        return lambda p: save_safetensors(shard, p, meta)

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
    return commit_or_explain(target, files, stale=weight_files)

"""The server's memories: many memories for one loaded model, kept on disk, one attached at a time.

Layout under the data directory (`--data-dir`):

    memories/<id>/memory.safetensors   the memory (mplus_fast.memories format)
    memories/<id>/memory.json          id, created, parent, injections, tokens injected

Both files of a memory are replaced together as one crash-safe commit (`mplus_fast.atomic`), so a
server killed at any instant restarts with each memory as it was before or after its last
injection, never a mix. Ids are chosen by the server ("mem-<12 hex>") or by the client from
[A-Za-z0-9_.-] (1–64 characters, starting with a letter or digit): a client never names a path.
"default" is created from the checkpoint's memory on first start and is used by requests that
name no memory.

Every method runs on the model worker thread (`worker.ModelWorker`), so nothing here needs a lock.
`attach(id)` makes a memory the model's (restoring it from disk unless it is attached already);
a failed injection detaches it, so the next request reloads it as it is on disk.

Resident memories: the last memories used stay in host memory (`ResidentMemories`, at most
`resident_bytes`, least recently used dropped first) as snapshots of the model, which carry the
fast backend's K/V of every row; switching back to one restores it without reading the disk and
without projecting its rows again. A resident copy is always the memory as it is on disk (it is
taken when the memory is written or read), so it can be dropped at any moment.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from pathlib import Path

from mplus_fast.memories import Memory, MemoryMismatchError, check_compatible, read_memory, write_memory
from mplus_fast.serve.errors import APIError, bad_request, not_found

DEFAULT_ID = "default"
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
META_FILE = "memory.json"


def check_id(memory_id, param: str = "memory_id") -> str:
    if not isinstance(memory_id, str) or not ID.match(memory_id):
        raise bad_request(f"{param}={memory_id!r} is not a valid memory id (1-64 characters from A-Z a-z 0-9 _ . -, "
                          "starting with a letter or digit)", param)
    return memory_id


class ResidentMemories:
    """Snapshots of recently used memories, by id, within a byte budget (least recently used out first)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: dict[str, Memory] = {}      # insertion order = use order

    @staticmethod
    def size(memory: Memory) -> int:
        return memory.nbytes + memory.derived_nbytes

    def __contains__(self, memory_id: str) -> bool:
        return memory_id in self._items

    def get(self, memory_id: str) -> Memory | None:
        memory = self._items.pop(memory_id, None)
        if memory is not None:
            self._items[memory_id] = memory       # most recently used
        return memory

    def put(self, memory_id: str, memory: Memory) -> None:
        self._items.pop(memory_id, None)
        if self.size(memory) > self.max_bytes:
            return                                 # larger than the budget: read from disk when needed
        self._items[memory_id] = memory
        while self.nbytes > self.max_bytes:
            del self._items[next(iter(self._items))]

    def drop(self, memory_id: str) -> None:
        self._items.pop(memory_id, None)

    @property
    def nbytes(self) -> int:
        return sum(self.size(m) for m in self._items.values())


class MemoryRegistry:
    def __init__(self, model, data_dir: Path, max_memories: int = 256, resident_bytes: int = 1 << 30):
        self.model = model
        self.resident = ResidentMemories(resident_bytes)
        self.root = Path(data_dir) / "memories"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_memories = max_memories
        self.checkpoint_memory: Memory = model.snapshot()   # what "create" starts from
        self.meta: dict[str, dict] = {}
        self.active: str | None = None
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and folder.name.startswith(".deleted-"):
                shutil.rmtree(folder, ignore_errors=True)      # a delete interrupted after its rename
            elif folder.is_dir() and ID.match(folder.name) and (folder / "memory.safetensors").exists():
                self.meta[folder.name] = self._read_meta(folder)
        if DEFAULT_ID not in self.meta:
            self._write(DEFAULT_ID, self.checkpoint_memory, {"parent": None})

    # ------------------------------------------------------------------ disk
    def _folder(self, memory_id: str) -> Path:
        return self.root / check_id(memory_id)

    def _read_meta(self, folder: Path) -> dict:
        memory = read_memory(folder)      # completes an interrupted commit, and checks the file is a memory
        try:
            check_compatible(self.model, memory)
        except MemoryMismatchError as exc:
            raise MemoryMismatchError(f"{folder}: {exc}. This data directory belongs to another model: "
                                      "start the server with that model, or give another --data-dir") from None
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError):
            meta = {}
        meta["id"] = folder.name
        return meta

    def _write(self, memory_id: str, memory: Memory, meta: dict) -> dict:
        now = time.time()
        full = {"id": memory_id, "created": int(now), "parent": None, "injections": 0, "tokens_injected": 0,
                **self.meta.get(memory_id, {}), **meta, "updated": int(now)}
        full.update({k: v for k, v in memory.stats().items() if k in ("ltm_tokens_per_layer", "pending_tokens", "bytes")})
        write_memory(self._folder(memory_id), memory, {META_FILE: json.dumps(full, indent=1) + "\n"})
        self.meta[memory_id] = full
        if memory.derived is not None:
            self.resident.put(memory_id, memory)   # what is on disk now, with its K/V
        else:
            self.resident.drop(memory_id)
        return full

    # ------------------------------------------------------------------ lifecycle
    def get(self, memory_id: str) -> dict:
        check_id(memory_id)
        if memory_id not in self.meta:
            raise not_found(f"memory {memory_id!r} not found", "memory_id")
        return self.meta[memory_id]

    def list(self) -> list[dict]:
        return [self.meta[k] for k in sorted(self.meta)]

    def _new_id(self, memory_id: str | None) -> str:
        if len(self.meta) >= self.max_memories:
            raise APIError(400, f"the server holds {len(self.meta)} memories, its limit (--max-memories); delete one first",
                           code="too_many_memories")
        if memory_id is None:
            while (memory_id := f"mem-{secrets.token_hex(6)}") in self.meta:
                pass
        check_id(memory_id, "id")
        if memory_id in self.meta:
            raise APIError(409, f"memory {memory_id!r} already exists", param="id", code="already_exists")
        return memory_id

    def create(self, memory_id: str | None = None) -> dict:
        """A new memory: a copy of the checkpoint's memory."""
        memory_id = self._new_id(memory_id)
        return self._write(memory_id, self.checkpoint_memory, {"parent": None, "injections": 0, "tokens_injected": 0,
                                                               "created": int(time.time())})

    def fork(self, source: str, memory_id: str | None = None) -> dict:
        """A new memory: a copy of `source` as it is now."""
        src = self.get(source)
        memory_id = self._new_id(memory_id)
        memory = self.model.snapshot() if self.active == source else read_memory(self._folder(source))
        return self._write(memory_id, memory, {"parent": source, "injections": src.get("injections", 0),
                                               "tokens_injected": src.get("tokens_injected", 0),
                                               "created": int(time.time())})

    def delete(self, memory_id: str) -> dict:
        meta = self.get(memory_id)
        if memory_id == DEFAULT_ID:
            raise bad_request("the 'default' memory cannot be deleted (requests without memory_id use it)", "memory_id")
        folder = self._folder(memory_id)
        trash = folder.with_name(f".deleted-{memory_id}-{secrets.token_hex(4)}")
        folder.rename(trash)          # one atomic step: the memory is gone, then its files
        shutil.rmtree(trash, ignore_errors=True)
        del self.meta[memory_id]
        self.resident.drop(memory_id)
        if self.active == memory_id:
            self.active = None
        return meta

    # ------------------------------------------------------------------ use
    def attach(self, memory_id: str) -> None:
        """Make `memory_id` the model's memory: nothing to do when it is attached, else from the
        resident snapshots (no disk read, no K/V recomputed) or from disk."""
        self.get(memory_id)
        if self.active == memory_id:
            return
        self.active = None
        memory = self.resident.get(memory_id)
        if memory is not None:
            self.model.restore(memory)
        else:
            memory = read_memory(self._folder(memory_id))
            self.model.restore(memory)
            if memory.nbytes <= self.resident.max_bytes:
                self.resident.put(memory_id, self.model.snapshot())   # the disk's memory, with its K/V
        self.active = memory_id

    def commit(self, memory_id: str, chunks: int, tokens: int) -> dict:
        """Persist the attached memory after an injection of `chunks` chunks / `tokens` tokens."""
        meta = self.get(memory_id)
        return self._write(memory_id, self.model.snapshot(), {"injections": meta.get("injections", 0) + chunks,
                                                              "tokens_injected": meta.get("tokens_injected", 0) + tokens})

    def detach(self) -> None:
        """Forget what is attached (after a failure): the next `attach` reloads it from disk."""
        self.active = None

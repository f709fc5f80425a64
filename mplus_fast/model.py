"""`MPlus`: the public model, mirroring the reference API (forward, inject_memory, generate,
save_pretrained) on top of a backend that does the arithmetic.

The model owns: the config, the fixed weights (in the compute dtype on the compute device), the
memory state, the RoPE state, and one random generator from which every random choice (memory
drops, sampling) is drawn, so a seeded run is reproducible and survives save → reload.
"""
from __future__ import annotations

import json
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mplus_fast.checkpoint import OURS, load_checkpoint, read_generation_config, write_checkpoint
from mplus_fast.config import MPlusConfig
from mplus_fast.backends import BACKENDS, make_backend
from mplus_fast import inputs
from mplus_fast.concurrency import ModelGate, serialised
from mplus_fast.inputs import resolve_device, resolve_dtype
from mplus_fast.loading import Placement, Streamed, apply_preset

LTM_PLACEMENTS = ("device", "host")
from mplus_fast.memory import AGE_MODES, MemoryState, UpdateRecord
from mplus_fast.store import HandedOverState
from mplus_fast.rope import RotaryEmbedding
from mplus_fast.weights import Weights


@dataclass
class MPlusOutput:
    logits: torch.Tensor                      # (B, n, V) float32
    ltm_indices: tuple[torch.Tensor, ...]     # per layer (B, R'): retrieved rows, placement order
    ltm_provenance: tuple[torch.Tensor, ...]  # per layer (B, R'): injection id of each retrieved row (-1: from the checkpoint)

    def recalled_injections(self, layer: int | None = None, batch: int = 0) -> dict[int, int]:
        """How many retrieved rows came from each injection id (one layer, or all layers)."""
        layers = range(len(self.ltm_provenance)) if layer is None else [layer]
        counts: dict[int, int] = {}
        for l in layers:
            for i in self.ltm_provenance[l][batch].tolist():
                counts[i] = counts.get(i, 0) + 1
        return counts


def _folder_tokenizer(path, tokenizer):
    """`tokenizer="auto"`: the checkpoint folder's tokenizer when it has one and the `tokenizers`
    package is installed (one that cannot be read is reported as a warning: the weights and the
    memory still load); None: no tokenizer; anything else is used as given."""
    if isinstance(tokenizer, str) and tokenizer == "auto":
        from mplus_fast.hf.tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer
        if not (Path(path) / TOKENIZER_FILE).is_file():
            return None
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            return None
        try:
            return load_tokenizer(path)
        except TokenizerError as exc:
            warnings.warn(f"the checkpoint's tokenizer was not loaded: {exc}", stacklevel=3)
            return None
    return tokenizer


def _check_options(device, dtype, backend, seed, age_mode, ltm_placement) -> tuple[torch.device, torch.dtype]:
    """The model's options checked (before anything is read or built): its device and dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available (choose from {list(BACKENDS)})")
    if age_mode not in AGE_MODES:
        raise ValueError(f"age_mode={age_mode!r} is not one of {list(AGE_MODES)}")
    if ltm_placement not in LTM_PLACEMENTS:
        raise ValueError(f"ltm_placement={ltm_placement!r} is not one of {list(LTM_PLACEMENTS)}")
    if ltm_placement != "device" and backend != "fast":
        raise ValueError(f"ltm_placement={ltm_placement!r} needs backend='fast' (the reference keeps its bank as loaded)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed={seed!r} must be an integer or None")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if dtype == torch.float64 and backend != "reference":
        raise ValueError(f"dtype=torch.float64 needs backend='reference' (the {backend} backend's kernels run "
                         "float32, bfloat16 and float16)")
    return device, dtype


class MPlus:
    """An M+ (or MemoryLLM) model with its memory. Create with `mplus_fast.load(path)`."""

    def __init__(self, config: MPlusConfig, tensors: dict[str, torch.Tensor], *, device="cpu", dtype=None,
                 backend: str = "fast", seed: int | None = None, age_mode: str = "inference",
                 generation_config: dict | None = None, ltm_placement: str = "device"):
        self._gate = ModelGate()   # one call at a time (mplus_fast.concurrency)
        # Names this model's weights in this dtype: a snapshot's cached K/V are reused on restore
        # only by the model that made them (mplus_fast.memories).
        self.derived_tag = secrets.token_hex(8)
        self.device, self.dtype = _check_options(device, dtype, backend, seed, age_mode, ltm_placement)
        self.ltm_placement = ltm_placement
        self.config = config
        self.age_mode = age_mode
        self.generation_config = dict(generation_config or {})
        # Each tensor in its place (mplus_fast.loading); those from_pretrained streamed in are there
        # already, and are this model's own: its memory store keeps them instead of copying them.
        handed_over = isinstance(tensors, Streamed)
        placement = Placement(config, self.device, self.dtype, backend)
        tensors = placement.convert_all(tensors)
        self.weights = Weights.from_tensors(config, tensors)
        if placement.originals_on_host():
            self.weights.merge_adapted_on(self.device)
        # bf16/fp16 parity: the reference casts RoPE's inverse frequencies along with the model.
        self.rope = RotaryEmbedding(config, round_inv_freq_to=None if self.dtype == torch.float32 else self.dtype,
                                    device=self.device)
        state = self._state_from_tensors(tensors, handed_over)
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        if f"{OURS}generator_state" in tensors:
            self.generator.set_state(tensors[f"{OURS}generator_state"].to(torch.uint8))
        if f"{OURS}rope_cached_len" in tensors:
            self.rope.load_state({"inv_freq": tensors[f"{OURS}rope_inv_freq"], "cached_len": int(tensors[f"{OURS}rope_cached_len"])})
        self.backend_name = backend
        self.last_update: UpdateRecord | None = None
        self.backend = make_backend(backend, self, state)
        self.source: Path | None = None     # the checkpoint folder (from_pretrained), for reset()
        self.tokenizer = None               # a mplus_fast.hf.TextTokenizer (from_pretrained finds the folder's)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device="cpu", dtype=None, backend: str = "fast",
                        seed: int | None = None, age_mode: str = "inference", ltm_placement: str | None = None,
                        tokenizer="auto", preset: str | None = None) -> "MPlus":
        """`mplus_fast.load`: the checkpoint streamed in, each tensor converted to its place.
        `preset` ("low-memory"): named options (`mplus_fast.loading.PRESETS`); ltm_placement
        None: "device" unless the preset says otherwise."""
        chosen = apply_preset(preset, dtype=dtype, ltm_placement=ltm_placement)
        dtype, ltm_placement = chosen["dtype"], chosen["ltm_placement"] or "device"
        device, dtype = _check_options(device, dtype, backend, seed, age_mode, ltm_placement)   # before reading
        config, tensors = load_checkpoint(path, lambda c: Placement(c, device, dtype, backend).convert)
        gen = read_generation_config(path, config)
        model = cls(config, Streamed(tensors), device=device, dtype=dtype, backend=backend, seed=seed, age_mode=age_mode,
                    generation_config=gen, ltm_placement=ltm_placement)
        model.source = Path(path)
        model.tokenizer = _folder_tokenizer(path, tokenizer)
        return model

    def _state_from_tensors(self, t: dict[str, torch.Tensor], handed_over: bool = False) -> MemoryState:
        """The memory of a checkpoint's tensors in the reference layout, left where the tensors are
        (the host, for a loaded checkpoint) and in their dtype: the backend's store copies each
        column once, to where its layout keeps it (so with ltm_placement="host" the LTM hidden
        states and K/V never reach the device). `handed_over`: the tensors are this model's own
        (streamed in), so the store keeps those already in place instead (`HandedOverState`)."""
        c = self.config
        L, N = c.num_hidden_layers, c.stm_size
        i64 = dict(dtype=torch.int64)
        get = lambda name, default: t[name] if name in t else default
        st = (HandedOverState if handed_over else MemoryState)(
            stm=t["memory"],
            stm_ages=torch.stack([get(f"memory_ages.{i}", torch.zeros(N)).to(**i64) for i in range(L)]),
            stm_prov=get(f"{OURS}stm_provenance", torch.full((L, N), -1)).to(**i64),
            update_step=int(get("update_step", torch.tensor(0))),
            next_injection_id=int(get(f"{OURS}next_injection_id", torch.tensor(0))),
            initialized=bool(int(get("initialized", torch.tensor(1)))),
            stm_slots=t[f"{OURS}stm_slots"].to(**i64) if f"{OURS}stm_slots" in t else None,
        )
        if not c.is_mplus:
            return st
        s = c.selector_hidden_dim
        # SPEC §10: the authors keep ltm_ages in the model dtype, so their bf16/fp16 load rounds
        # them (267 and 269 -> 268) before truncation. A checkpoint saved by mplus_fast holds the
        # ages the model had (rounded at its first load, then integers): those load as they are.
        round_ages = self.dtype in (torch.bfloat16, torch.float16) and f"{OURS}next_injection_id" not in t
        for i in range(L):
            n = t[f"ltm.{i}"].shape[0]
            st.ltm.append(t[f"ltm.{i}"])
            st.ltm_keys.append(t[f"ltm_keys.{i}"])
            ages = t[f"ltm_ages.{i}"].to(self.dtype) if round_ages else t[f"ltm_ages.{i}"]
            st.ltm_ages.append(ages.to(**i64))  # stored as floats: truncate
            st.ltm_rf.append(t[f"ltm_recall_frequencies.{i}"].to(torch.float64))
            st.ltm_prov.append(get(f"{OURS}ltm_provenance.{i}", torch.full((n,), -1)).to(**i64))
            st.pend.append(get(f"cached_dropped_memories.{i}", torch.zeros(0, c.hidden_size)))
            st.pend_keys.append(get(f"cached_dropped_keys.{i}", torch.zeros(0, s)))
            c_len = st.pend[-1].shape[0]
            st.pend_ages.append(get(f"cached_dropped_memory_ages.{i}", torch.zeros(c_len)).to(**i64))
            st.pend_prov.append(get(f"{OURS}pending_provenance.{i}", torch.full((c_len,), -1)).to(**i64))
        return st

    # ------------------------------------------------------------------ input checks (mplus_fast.inputs)
    def _check_ids(self, ids, name: str) -> torch.Tensor:
        return inputs.check_ids(ids, name, self.config.vocab_size, self.device)

    def _check_mask(self, mask, ids: torch.Tensor, name: str = "attention_mask") -> torch.Tensor:
        return inputs.check_mask(mask, ids, self.device, name)

    def _check_read(self, ids: torch.Tensor, valid: torch.Tensor, name: str, new_tokens: int = 0) -> None:
        """Checked ids and mask of a read (forward, generate): no leading BOS, positions in range."""
        inputs.check_no_leading_bos(ids, valid, self._bos_ids(), name)
        prefix = self.config.read_prefix_len if self.backend.counts()["initialized"] else 0
        inputs.check_positions(self.config.max_positions, prefix, int(valid.sum(1).max()), name, new_tokens)

    def _bos_ids(self) -> set[int]:
        ids = {self.config.bos_token_id, self.generation_config.get("bos_token_id")}
        return {i for i in ids if isinstance(i, int) and not isinstance(i, bool)}

    # ------------------------------------------------------------------ reading
    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, *, retrieve: bool = True) -> MPlusOutput:
        return self.forward(input_ids, attention_mask, retrieve=retrieve)

    @torch.inference_mode()
    @serialised()
    def forward(self, input_ids, attention_mask=None, *, retrieve: bool = True) -> MPlusOutput:
        """Plain forward over the memory (SPEC §3): float32 logits for every input position.
        `retrieve=False` reads the short-term memory only (no LTM rows, the STM at its usual
        positions R+1…R+N, as with an empty LTM): the STM-only baseline of M+."""
        inputs.check_flag(retrieve, "retrieve")
        ids = self._check_ids(input_ids, "input_ids")
        valid = self._check_mask(attention_mask, ids)
        self._check_read(ids, valid, "input_ids")
        res = self.backend.read(ids, valid, retrieve=retrieve)
        return MPlusOutput(res.logits, tuple(res.ltm_indices), tuple(res.ltm_provenance))

    # ------------------------------------------------------------------ writing
    @torch.inference_mode()
    @serialised()
    def inject_memory(self, context_ids, update_memory: bool = False, attention_mask=None) -> torch.Tensor:
        """Encode a context into T new memory tokens per layer (B, L, T, d); with
        `update_memory=True` also write them into the memory (SPEC §5). A batch is injected one
        sequence after another, in order (padding stripped), exactly as separate calls would."""
        inputs.check_flag(update_memory, "update_memory")
        ids = self._check_ids(context_ids, "context_ids")
        valid = self._check_mask(attention_mask, ids)
        inputs.check_no_leading_bos(ids, valid, self._bos_ids(), "context_ids")
        lengths = valid.sum(1).tolist()
        T = self.config.num_tokens
        inputs.check_positions(self.config.max_positions, 1 + T, max(lengths), "context_ids")
        inputs.warn_short_injection(lengths, T)
        deltas = []
        for b in range(ids.shape[0]):
            delta = self.backend.inject(ids[b][valid[b]])
            if update_memory:
                self.last_update = self._update(delta)
            deltas.append(delta)
        return torch.stack(deltas)

    def _update(self, delta: torch.Tensor) -> UpdateRecord:
        return self.backend.update(delta)

    @property
    @serialised(nestable=True)
    def state(self) -> MemoryState:
        """The memory in the reference layout (logical STM order, per-layer LTM and pending tensors):
        views of the live rows where the store keeps them (the LTM hidden states of the fast backend
        on the host), no copy but the STM gathered into logical order. Valid until the next update:
        read it, do not mutate it; `.clone()` it (or `snapshot()`) to keep it."""
        return self.backend.memory_state()

    # ------------------------------------------------------------------ generation
    @serialised()
    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Greedy or sampled continuation; returns prompt + new tokens (B, n + new). See
        `mplus_fast.generation.generate` for the options."""
        from mplus_fast.generation import generate
        return generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ text (mplus_fast.text)
    def complete(self, prompt: str, **kwargs):
        """Text in, text out: a `mplus_fast.text.Completion` (.text, .token_ids, .finish_reason).
        Takes `generate`'s options (max_new_tokens, do_sample, stop_strings, streamer, ...)."""
        from mplus_fast.text import complete
        return complete(self, prompt, **kwargs)

    def chat(self, messages: list[dict], **kwargs):
        """A reply to `messages` ([{"role": ..., "content": ...}]) with the chat template."""
        from mplus_fast.text import chat
        return chat(self, messages, **kwargs)

    def inject_text(self, text: str, chunk_tokens: int | None = None) -> list[int]:
        """Write a document into the memory in chunks of about T tokens (no tiny tail); returns
        the injection id of each chunk."""
        from mplus_fast.text import inject_text
        return inject_text(self, text, chunk_tokens=chunk_tokens)

    # ------------------------------------------------------------------ memories (mplus_fast.memories)
    @serialised(nestable=True)
    def snapshot(self):
        """A `Memory` copy of the current memory (CPU), to restore later or save."""
        from mplus_fast.memories import snapshot
        return snapshot(self)

    @serialised()
    def restore(self, memory) -> None:
        """Make `memory` (from snapshot/load) the model's memory; the weights stay loaded."""
        from mplus_fast.memories import restore
        restore(self, memory)

    @serialised()
    def reset(self) -> None:
        """Back to the memory of the checkpoint this model was loaded from."""
        from mplus_fast.memories import reset
        reset(self)

    @serialised(nestable=True)
    def save_memory(self, path) -> Path:
        """Write only the memory (a .safetensors file, or memory.safetensors in a folder), atomically."""
        from mplus_fast.memories import write_memory
        return write_memory(path, self.snapshot())

    @serialised()
    def load_memory(self, path) -> None:
        """Read a memory saved by `save_memory` and make it the model's (refused if it belongs to another model)."""
        from mplus_fast.memories import read_memory, restore
        restore(self, read_memory(path))

    # ------------------------------------------------------------------ persistence
    @serialised(nestable=True)
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything `save_pretrained` writes: upstream names plus `mplus_fast.` extras."""
        c, st = self.config, self.state
        out = dict(self.weights.to_tensors(c))
        out["memory"] = st.stm
        out["update_step"] = torch.tensor(st.update_step, dtype=torch.int64)
        if not c.is_mplus:
            out["initialized"] = torch.tensor(int(st.initialized), dtype=torch.uint8)
        out[f"{OURS}stm_provenance"] = st.stm_prov
        if st.stm_slots is not None:
            out[f"{OURS}stm_slots"] = st.stm_slots
        out[f"{OURS}next_injection_id"] = torch.tensor(st.next_injection_id, dtype=torch.int64)
        out[f"{OURS}generator_state"] = self.generator.get_state()
        rope = self.rope.state()
        out[f"{OURS}rope_inv_freq"], out[f"{OURS}rope_cached_len"] = rope["inv_freq"], torch.tensor(rope["cached_len"])
        for i in range(c.num_hidden_layers):
            out[f"memory_ages.{i}"] = st.stm_ages[i]
            if not c.is_mplus:
                continue
            out[f"ltm.{i}"], out[f"ltm_keys.{i}"] = st.ltm[i], st.ltm_keys[i]
            out[f"ltm_ages.{i}"] = st.ltm_ages[i].to(torch.float32)  # upstream stores ages as floats
            out[f"ltm_recall_frequencies.{i}"] = st.ltm_rf[i].to(torch.float32)
            out[f"cached_dropped_memories.{i}"], out[f"cached_dropped_keys.{i}"] = st.pend[i], st.pend_keys[i]
            out[f"cached_dropped_memory_ages.{i}"] = st.pend_ages[i]
            out[f"{OURS}ltm_provenance.{i}"], out[f"{OURS}pending_provenance.{i}"] = st.ltm_prov[i], st.pend_prov[i]
        return out

    @serialised(nestable=True)
    def save_pretrained(self, path: str | Path, max_shard_size: int = 5 * 2**30, overwrite: bool = False) -> Path:
        """Write the checkpoint (weights and memory, upstream layout) into the folder `path`, as one
        crash-safe commit: config.json, generation_config.json (when the model has one) and the
        weight files are replaced, the previous checkpoint's stale shards removed, and every other
        file in the folder (tokenizer, README, anything of the user's) left alone. A folder holding
        another kind of config.json or weights is refused unless `overwrite=True`."""
        extra = {"generation_config.json": json.dumps(self.generation_config, indent=2) + "\n"} if self.generation_config else None
        cfg = MPlusConfig.from_dict({**self.config.to_dict(), "torch_dtype": str(self.dtype).replace("torch.", "")})
        return write_checkpoint(path, cfg, self.state_tensors(), extra, max_shard_size, overwrite=overwrite)

    # ------------------------------------------------------------------ introspection
    @serialised(nestable=True)
    def memory_counts(self) -> dict:
        """Row counts only (ltm_sizes, pending, update_step, injections, initialized): what a loop
        over injections needs, without `memory_stats`'s byte accounting."""
        return dict(self.backend.counts())

    @serialised(nestable=True)
    def memory_stats(self) -> dict:
        """Sizes and bytes of the memory (cheap: no snapshot of the state is made)."""
        c, st = self.config, self.memory_counts()
        stats = {
            "architecture": c.architecture,
            "backend": self.backend_name,
            "ltm_placement": self.ltm_placement,
            "stm_tokens_per_layer": c.stm_size,
            "ltm_tokens_per_layer": st["ltm_sizes"],
            "synthetic_ltm": st.get("synthetic_ltm", False),
            "ltm_retrieved_per_layer": c.ltm_retrieved,
            "pending_tokens": st["pending"],
            "update_step": st["update_step"],
            "merge_every_tokens": c.update_ltm_frequency * c.num_tokens if c.is_mplus else None,
            "injections": st["injections"],
            "initialized": st["initialized"],
            "memory_bytes_by_device": self.backend.memory_bytes_by_device(),
            "weight_bytes": self.weights.nbytes(),
            "bytes": self._bytes_by_component(),
        }
        return stats

    MEMORY_COMPONENTS = ("weights", "stm", "bank_kv", "retrieval_keys", "hidden_states", "bank_meta",
                         "pinned_staging", "decode_cache")

    def _bytes_by_component(self) -> dict[str, dict[str, int]]:
        """{component: {"device": bytes, "host": bytes}} allocated now: "device" is the compute
        device, "host" CPU memory besides it (on a CPU model everything is "device"). Weights count
        each storage once (the fused copies and their views, the originals kept for saving);
        `stm` is every STM column (hidden states, K/V, ages, provenance, slot order),
        `hidden_states` the LTM and pending ones, `bank_meta` their ages, recall frequencies and
        provenance. The decode cache lives only during a `generate` call (0 between calls)."""
        out = {name: {"device": 0, "host": 0} for name in self.MEMORY_COMPONENTS}
        side = lambda dev: "device" if torch.device(dev) == self.device else "host"
        seen = set()
        backend_weights = getattr(self.backend, "weight_tensors", lambda: ())()
        for t in [*self.weights.to_tensors_flat(), *backend_weights]:
            key, nbytes = _storage_key(t)
            if key not in seen:
                seen.add(key)
                out["weights"][side(t.device)] += nbytes
        for name, per_device in self.backend.memory_bytes().items():
            for dev, n in per_device.items():
                out[name][side(dev)] += n
        out["pinned_staging"]["host"] += getattr(self.backend, "pinned_bytes", lambda: 0)()
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"MPlus({c.architecture}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"stm={c.stm_size}, R={c.ltm_retrieved}, ltm={self.backend.counts()['ltm_sizes'][:1]}..., "
                f"device={self.device}, dtype={self.dtype}, backend={self.backend_name})")


def _storage_key(t: torch.Tensor) -> tuple[tuple, int]:
    """(identity, bytes) of the memory under `t`: views of one storage count once. Tensors without
    a readable storage (meta, tensor subclasses) count as themselves."""
    try:
        storage = t.untyped_storage()
        if storage.data_ptr():
            return (str(t.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        pass
    return (str(t.device), id(t)), t.numel() * t.element_size()


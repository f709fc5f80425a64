"""The memory budget of the engine at any geometry, counted from the tensors its own code allocates.

Nothing here knows how big a weight, a cache or a bank is: the engine is run for real (the model
built from a checkpoint's tensors as the streaming loader hands them over, a prefill of the
prompt, then cached decode steps) on tensors that carry a shape, a dtype and a device but no
data (PyTorch's FakeTensorMode), while a dispatch mode tallies every storage the operations
create and its release (weak references on the storages), per device, and keeps the peak. So
the budget follows the code: change how the engine allocates, and the numbers change with it.

The simulated accelerator is PyTorch's `meta` device: the engine takes its GPU paths there
(fused weights as transposed views, the originals of the adapted projections in host memory,
the bank on the host when `ltm_placement="host"`, attention by SDPA), while the host is a fake
CPU. Data-dependent values the code reads back (a maximum position, "any pending row?") have
no value on fake tensors: they read as 0 / False (a small tensor built from Python numbers keeps
its value), which is the empty-pending, no-padding case. Not simulated: the prefetch engine's
pinned staging (on a real GPU 2 requests × B·R rows, ≈ 21 MB at the released geometry; here its
CPU path runs, which stages nothing), CUDA-graph pools of the static decoder, the CUDA context
and the caching allocator's slack (typically 0.5–1.5 GB on a real card: keep that headroom).

    from mplus_fast.budget import released_budget
    print(released_budget(ltm_placement="host").table())      # also: mplus-fast budget --help
"""
from __future__ import annotations

import contextlib
import re
import threading
import weakref
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mplus_fast.config import MPlusConfig
from mplus_fast.loading import Placement
from mplus_fast.weights import expected_weight_shapes

ACCELERATOR = torch.device("meta")     # stands for the GPU
GB = 1e9
aten = torch.ops.aten


# ---------------------------------------------------------------------- counting storages
class StorageTally(TorchDispatchMode):
    """Live bytes per device of every storage created by the operations it sees, and the peak.

    Each new storage is counted once (views share it) and uncounted when it is freed (a weak
    reference on the storage fires then). Inside FakeTensorMode it also answers the reads of
    data-dependent values the fake tensors cannot answer (see the module notes)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[str, int]] = {}      # storage id -> (device kind, bytes)
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default):
            try:
                return func(*args, **kwargs)          # a fake tensor built from Python numbers knows its value
            except DataDependentOutputException:
                t = args[0]
                if func is aten.is_nonzero.default or t.dtype == torch.bool:
                    return False
                return 0.0 if t.dtype.is_floating_point else 0
        if func is aten.equal.default:                # e.g. "are the cached RoPE frequencies these?"
            a, b = args[:2]
            return a.shape == b.shape and a.dtype == b.dtype
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        with self._lock:
            if key in self.live:
                return
            kind = device_kind(t.device)
            self.live[key] = (kind, storage.nbytes())
            self._add(kind, storage.nbytes())
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        with self._lock:
            kind, n = self.live.pop(key, (None, 0))
            if kind is not None:
                self._add(kind, -n)

    def _add(self, kind: str, n: int) -> None:
        self.now[kind] = self.now.get(kind, 0) + n
        self.peak[kind] = max(self.peak.get(kind, 0), self.now[kind])

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = dict(self.now)


def device_kind(device: torch.device) -> str:
    return "device" if device.type != "cpu" else "host"


# ---------------------------------------------------------------------- naming what is live
# Attribute paths of the model (indices folded to [*]) -> component names; the first match wins,
# an unmatched path is reported as itself (a renamed field shows up, it is never lost). Both the
# backend's own fields and the memory store's columns (backend.store.*) are recognised.
ROTATED = "[bos | STM] K/V, rotated (read in place by prefill and decode)"
COMPONENTS = [
    (r"backend\.(dec|enc)\b.*|backend\.lm_head_t", "weights: fused and merged projections, lm_head"),
    (r"weights\.layers\[\*\]\.proj\b.*", "weights: originals of the adapted projections (for saving)"),
    (r"weights\.embed", "weights: token embeddings"),
    (r"weights\.layers\[\*\]\.o_proj", "weights: fused and merged projections, lm_head"),   # a view of the fused o_proj
    (r"weights\..*", "weights: norms, selectors, bos"),
    (r"backend\.bos_(dec|enc)\b.*", "bos keys/values"),
    (r"backend\.(stm_h|store\.stm\.columns\.hidden)\b.*", "STM hidden states"),
    (r"backend\.(stm_kv|store\.stm\.columns\.kv)\b.*", "STM K/V"),
    (r"backend\.(order|stm_ages|stm_prov|store\.stm)\b.*", "STM slots, ages, provenance"),
    (r"backend\.shared\..*", ROTATED),
    (r"backend\._enc_prefix\b.*", "injection prefix K/V (cached)"),
    (r"backend\.(bank|store\.ltm)\[\*\]\.(columns\.)?kv\b.*", "LTM bank K/V"),
    (r"backend\.(bank|store\.ltm)\[\*\]\.(columns\.)?keys\b.*", "LTM retrieval keys"),
    (r"backend\.(bank|store\.ltm)\[\*\]\.(columns\.)?hidden\b.*", "LTM hidden states (for saving)"),
    (r"backend\.(bank|store\.ltm)\[\*\]\..*", "LTM ages, recall frequencies, provenance"),
    (r"backend\.(pend|store\.pend)\[\*\]\..*", "pending buffer"),
    (r"backend\._prefetch\..*", "prefetch staging"),
    (r"rope\..*", "RoPE frequencies"),
    (r"cache\..*", "decode cache"),
]


def _component(path: str) -> str:
    for pattern, name in COMPONENTS:
        if re.fullmatch(pattern, path):
            return name
    return path


# Paths that only alias what another path names: the backend's model back-reference, the bank
# the prefetch engine is pointed at.
ALIASES = re.compile(r"backend\.m|backend\._prefetch\.(bank|_bank)")


def storages_by_path(roots: dict[str, object], max_depth: int = 8) -> dict[int, tuple[str, str, int]]:
    """storage id -> (attribute path, device kind, bytes) for every tensor reachable from `roots`
    through attributes, lists, tuples and dicts; the first path that reaches a storage names it."""
    found: dict[int, tuple[str, str, int]] = {}
    seen: set[int] = set()

    def walk(obj, path: str, depth: int) -> None:
        if ALIASES.fullmatch(path):
            return
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s._cdata not in found:
                found[s._cdata] = (path, device_kind(obj.device), s.nbytes())
            return
        if depth > max_depth or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type)):
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, path + "[*]", depth + 1)
        elif isinstance(obj, dict):
            for k, x in obj.items():
                walk(x, f"{path}.{k}" if isinstance(k, str) and k.isidentifier() else path + "[*]", depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("mplus_fast"):   # the engine's own objects
            for k, x in vars(obj).items():
                walk(x, f"{path}.{k}" if path else k, depth + 1)

    for name, root in roots.items():
        walk(root, name, 0)
    return found


def components(tally: StorageTally, roots: dict[str, object]) -> dict[tuple[str, str], int]:
    """(component, device kind) -> live bytes, for the storages reachable from `roots`; what is
    live but unreachable from them is "other (transient)"."""
    out: dict[tuple[str, str], int] = {}
    named = storages_by_path(roots)
    for key, (kind, n) in list(tally.live.items()):
        name = _component(named[key][0]) if key in named else "other (transient)"
        out[(name, kind)] = out.get((name, kind), 0) + n
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------------- the scenario
@dataclass
class Phase:
    name: str
    peak: dict[str, int]      # device kind -> most bytes live at once during the phase
    end: dict[str, int]       # device kind -> bytes live when it ended


@dataclass
class Budget:
    """The budget of one scenario: phases with their peaks, and what is resident per component."""
    scenario: dict
    phases: list[Phase] = field(default_factory=list)
    resident: dict[tuple[str, str], int] = field(default_factory=dict)        # after loading
    at_decode: dict[tuple[str, str], int] = field(default_factory=dict)       # after the last decode step
    shared_prefix_in_decode_cache: int = 0     # device bytes of [bos | STM] copied into every sequence's cache

    def peak(self, kind: str = "device") -> int:
        return max(p.peak.get(kind, 0) for p in self.phases)

    def serving_peak(self, kind: str = "device") -> int:
        """The peak while the loaded model prefills and decodes (the phases after loading)."""
        return max(p.peak.get(kind, 0) for p in self.phases if not p.name.startswith("load"))

    def levers(self) -> list[tuple[str, int]]:
        """Engine changes that would shed device memory while serving, each with the bytes it
        frees in this run (read off the components, not estimated)."""
        dev = lambda name: self.at_decode.get((name, "device"), 0)
        levers = [
            ("STM hidden states on the host (only injections and saving read them)", dev("STM hidden states")),
            ("decode attends the batch-shared [bos | STM] prefix in place (log-sum-exp merge), not a copy per sequence",
             self.shared_prefix_in_decode_cache),
            # pulled with the bank on the host: the pre-RoPE column went there with it
            ("one [bos | STM] K/V copy on the device: the STM's pre-RoPE K/V on the host (read only to rebuild the "
             "rotated copy after an update)", dev("STM K/V") if dev(ROTATED) else 0),
            ("token embeddings on the host (a step's rows gathered there and copied over: d values per token)",
             dev("weights: token embeddings")),
        ]
        return [(what, n) for what, n in levers if n > 0]   # a lever already pulled frees nothing

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def table(self) -> str:
        s = self.scenario
        lines = [f"budget: {s['layers']} layers, d {s['hidden']}, STM {s['stm']:,}, R {s['R']:,}, "
                 f"LTM {s['ltm_rows']:,} rows/layer, {s['dtype']}, bank on the {s['ltm_placement']}, batch {s['batch']}, "
                 f"prompt {s['prompt']} + {s['new_tokens']} new tokens (GB = 1e9 bytes)",
                 f"{'phase':<34}{'device peak':>12}{'device end':>12}{'host peak':>12}{'host end':>12}"]
        for p in self.phases:
            lines.append(f"{p.name:<34}{_gb(p.peak.get('device')):>12}{_gb(p.end.get('device')):>12}"
                         f"{_gb(p.peak.get('host')):>12}{_gb(p.end.get('host')):>12}")
        lines.append(f"{'component (at the last decode step)':<60}{'device':>10}{'host':>10}")
        names = sorted({n for n, _ in self.at_decode}, key=lambda n: -self.at_decode.get((n, "device"), 0))
        for n in names:
            lines.append(f"{n:<60}{_gb(self.at_decode.get((n, 'device'))):>10}{_gb(self.at_decode.get((n, 'host'))):>10}")
        lines.append(f"of the decode cache, the [bos | STM] rows copied per sequence: {_gb(self.shared_prefix_in_decode_cache)} GB")
        lines.append(f"peak device memory: {_gb(self.peak('device'))} GB while loading, {_gb(self.serving_peak('device'))} GB "
                     f"while serving; peak host memory: {_gb(self.peak('host'))} GB")
        freed = 0
        for what, n in self.levers():
            freed += n
            lines.append(f"  lever: {what}: -{_gb(n)} GB")
        lines.append(f"serving peak with every lever: {_gb(self.serving_peak('device') - freed)} GB")
        return "\n".join(lines)


def _gb(n) -> str:
    return "–" if not n else f"{n / GB:.2f}"


def checkpoint_shapes(config: MPlusConfig, ltm_rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a checkpoint of `config` whose LTM holds `ltm_rows` rows per layer, as the
    authors' release stores them (float32), with an empty pending buffer."""
    shapes = {n: (s, torch.float32) for n, s in expected_weight_shapes(config).items()}
    L, d = config.num_hidden_layers, config.hidden_size
    shapes["memory"] = ((L, config.stm_size, d), torch.float32)
    for i in range(L):
        shapes[f"memory_ages.{i}"] = ((config.stm_size,), torch.float32)
        if config.is_mplus:
            shapes[f"ltm.{i}"] = ((ltm_rows, d), torch.float32)
            shapes[f"ltm_keys.{i}"] = ((ltm_rows, config.selector_hidden_dim), torch.float32)
            shapes[f"ltm_ages.{i}"] = ((ltm_rows,), torch.float32)
            shapes[f"ltm_recall_frequencies.{i}"] = ((ltm_rows,), torch.float32)
    return shapes


class SynchronousPrefetch:
    """The prefetch engine's interface served on the calling thread: fake tensors cannot be
    computed on the engine's worker thread. Its staging pool is allocated at its cap (num_staging
    requests of max_rows rows, in host memory), as the real engine's grows to under load."""

    def __init__(self, bank, device=None, num_staging: int = 2, max_rows: int = 4096, **_):
        self.bank, self.max_rows = bank, max_rows
        self.staging = torch.empty((num_staging * max_rows, *bank.shape[1:]), dtype=bank.dtype)

    def set_bank(self, bank) -> None:
        self.bank = bank

    def request(self, index):
        rows = self.bank[index.cpu()]
        return mock.Mock(wait=lambda: rows)


@contextlib.contextmanager
def simulated_accelerator():
    """Let the model be built on ACCELERATOR (the `meta` device) as if it were a GPU, with the
    bank's prefetch served synchronously."""
    import mplus_fast.model as model_module
    import mplus_fast.prefetch as prefetch_module
    from mplus_fast.rope import RotaryEmbedding
    real, inv_freq_for = model_module.resolve_device, RotaryEmbedding.inv_freq_for
    # The prefill hands the host-side RoPE frequencies to memory_attention, which requires them on
    # the queries' device (a defect of the GPU path, reported for issue 8); here they are moved
    # there (D/2 floats: no bytes that matter), as the fixed engine will.
    on_device = lambda rope, p: inv_freq_for(rope, p).to(ACCELERATOR)
    with mock.patch.object(model_module, "resolve_device", lambda d: ACCELERATOR if str(d) == "meta" else real(d)), \
            mock.patch.object(prefetch_module, "PrefetchEngine", SynchronousPrefetch), \
            mock.patch.object(RotaryEmbedding, "inv_freq_for", on_device):
        yield


def run_budget(config: MPlusConfig, *, dtype: torch.dtype = torch.bfloat16, ltm_placement: str = "host",
               ltm_rows: int | None = None, batch: int = 1, prompt: int = 512, new_tokens: int = 64,
               decode_steps: int | None = None) -> Budget:
    """Load (streamed, as `from_pretrained` does), prefill `batch` prompts of `prompt` tokens with
    a decode cache for `new_tokens` tokens, run `decode_steps` (default: all `new_tokens`) cached
    decode steps, with the fast backend on a GPU, and count what is allocated. The decode cache is
    static (allocated at prefill, one slot written per step), so fewer steps than `new_tokens`
    give the same peak, faster (a simulated step costs about a second here)."""
    from mplus_fast.loading import Streamed
    from mplus_fast.model import MPlus
    for name, value in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens),
                        ("decode_steps", 1 if decode_steps is None else decode_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"run_budget: {name}={value!r} must be a positive integer")
    if ltm_rows is not None and (isinstance(ltm_rows, bool) or not isinstance(ltm_rows, int) or ltm_rows < 0):
        raise ValueError(f"run_budget: ltm_rows={ltm_rows!r} must be a non-negative integer (rows per layer)")
    ltm_rows = config.max_ltm_tokens if ltm_rows is None else ltm_rows
    scenario = dict(layers=config.num_hidden_layers, hidden=config.hidden_size, stm=config.stm_size,
                    R=config.ltm_retrieved, ltm_rows=ltm_rows if config.is_mplus else 0, dtype=str(dtype).replace("torch.", ""),
                    ltm_placement=ltm_placement, batch=batch, prompt=prompt, new_tokens=new_tokens)
    budget = Budget(scenario)
    tally = StorageTally()
    with FakeTensorMode(allow_non_fake_inputs=True), tally, simulated_accelerator(), torch.inference_mode():
        phase = _phases(budget, tally)
        with phase("load: stream the checkpoint"):
            place = Placement(config, ACCELERATOR, dtype, "fast")
            tensors = Streamed()          # as `loading` hands them over: the model keeps them, memory rows included
            for name, (shape, stored) in checkpoint_shapes(config, ltm_rows).items():
                source = torch.empty(shape, dtype=stored)              # the float32 buffer read from the file
                tensors[name] = place.convert(name, source)
                del source
        with phase("load: build the model"):
            model = MPlus(config, tensors, device="meta", dtype=dtype, backend="fast", seed=0, ltm_placement=ltm_placement)
            del tensors
        budget.resident = components(tally, _roots(model))
        ids = torch.zeros(batch, prompt, dtype=torch.int64, device=ACCELERATOR)
        valid = torch.ones(batch, prompt, dtype=torch.bool, device=ACCELERATOR)
        with phase(f"prefill {prompt} tokens"):
            res = model.backend.read(ids, valid, cache_extra=new_tokens, last_only=True)
        cache, logits = res.cache, res.logits
        del res
        steps = new_tokens if decode_steps is None else min(decode_steps, new_tokens)
        with phase(f"decode {steps} of {new_tokens} tokens"):
            for _ in range(steps):
                logits = model.backend.decode_step(cache, logits[:, -1].argmax(-1) if logits.dim() == 3 else logits.argmax(-1))
        budget.at_decode = components(tally, {**_roots(model), "cache": cache})
        budget.shared_prefix_in_decode_cache = _shared_prefix_bytes(config, cache)
        del model, cache, logits
    return budget


def _roots(model) -> dict[str, object]:
    """Where the model's tensors are reached from; the backend first, so that a weight the fused
    projections share with an original (o_proj) is named by the fused copy."""
    return {"backend": model.backend, "weights": model.weights, "rope": model.rope}


def _phases(budget: Budget, tally: StorageTally):
    @contextlib.contextmanager
    def phase(name: str):
        tally.reset_peak()
        yield
        budget.phases.append(Phase(name, dict(tally.peak), dict(tally.now)))
    return phase


def _shared_prefix_bytes(config: MPlusConfig, cache) -> int:
    """Bytes of the decode cache that hold the batch-shared [bos | STM] rows, once per sequence
    and layer: 0 when decode attends them in place (`cache.shared`)."""
    if cache.shared:
        return 0
    shared = 1 + config.stm_size
    total = 0
    for k, v in zip(cache.k, cache.v):
        rows = k.shape[2]
        total += (k.untyped_storage().nbytes() + v.untyped_storage().nbytes()) * shared // rows
    return total


# ---------------------------------------------------------------------- the released model
def released_config() -> MPlusConfig:
    """M+ 8B as released (a Llama-3.1-8B backbone; SPEC §8): `mplus_fast.testing.RELEASED_MPLUS`."""
    from mplus_fast.testing import RELEASED_MPLUS, _config_dict
    return MPlusConfig.from_dict(_config_dict(dict(RELEASED_MPLUS)))


def released_budget(**scenario) -> Budget:
    """`run_budget` at the released geometry with a full LTM (153,600 rows per layer)."""
    return run_budget(released_config(), **scenario)


__all__ = ["Budget", "Phase", "StorageTally", "checkpoint_shapes", "released_budget", "released_config", "run_budget",
           "ACCELERATOR", "GB"]

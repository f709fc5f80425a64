"""The memory state of M+ / MemoryLLM in the reference layout, and the update's decisions (SPEC §2, §5, §7).

`MemoryState` is the exchange layout (checkpoints, `model.state`, `Memory` objects); the memory
itself lives in `mplus_fast.store.MemoryStore`, whose `update` / `merge` are the one
implementation of SPEC §5 (`apply_update` / `merge_pending` here run them over a state).

Per layer l:
  STM      `stm[l]` (N, d) in logical order (order fixes RoPE positions), `stm_ages[l]` (N,),
           `stm_prov[l]` (N,): the id of the injection that wrote each token (-1: from the checkpoint).
  LTM      `ltm[l]` (n_l, d), `ltm_keys[l]` (n_l, s), `ltm_ages[l]` (n_l,) int64,
           `ltm_rf[l]` (n_l,) float64 recall frequencies, `ltm_prov[l]` (n_l,).
  pending  dropped STM tokens not yet merged: `pend[l]`, `pend_keys[l]`, `pend_ages[l]`,
           `pend_prov[l]`; shared counter `update_step`.
Provenance is our addition: it travels with each token STM → pending → LTM, so a read can say
which injections its retrieved rows came from.

The update consumes the model's generator exactly like the reference consumes torch's global one
(one `randperm(N)` per layer, layers in order), so a seeded run reproduces a seeded reference run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mplus_fast.config import MPlusConfig

AGE_MODES = ("inference", "training")


@dataclass
class MemoryState:
    stm: torch.Tensor                   # (L, N, d)
    stm_ages: torch.Tensor              # (L, N) int64
    stm_prov: torch.Tensor              # (L, N) int64
    ltm: list[torch.Tensor] = field(default_factory=list)
    ltm_keys: list[torch.Tensor] = field(default_factory=list)
    ltm_ages: list[torch.Tensor] = field(default_factory=list)
    ltm_rf: list[torch.Tensor] = field(default_factory=list)
    ltm_prov: list[torch.Tensor] = field(default_factory=list)
    pend: list[torch.Tensor] = field(default_factory=list)
    pend_keys: list[torch.Tensor] = field(default_factory=list)
    pend_ages: list[torch.Tensor] = field(default_factory=list)
    pend_prov: list[torch.Tensor] = field(default_factory=list)
    update_step: int = 0
    next_injection_id: int = 0
    initialized: bool = True            # MemoryLLM's flag; M+ is always initialized
    # The fast backend's physical slot of each logical STM position (L, N), when known: saved so a
    # reload restores the same layout and hence the same float32 summation order, bit for bit.
    stm_slots: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.stm.shape[0]

    def clone(self) -> "MemoryState":
        def c(x):
            return [t.clone() for t in x] if isinstance(x, list) else (x.clone() if isinstance(x, torch.Tensor) else x)
        return MemoryState(**{k: c(v) for k, v in self.__dict__.items()})

    def pending_len(self) -> int:
        return self.pend[0].shape[0] if self.pend else 0

    def ltm_sizes(self) -> list[int]:
        return [t.shape[0] for t in self.ltm]

    def tensors(self):
        for v in self.__dict__.values():
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, list):
                yield from v

    def bytes_by_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors():
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
        return out


# ---------------------------------------------------------------------- the update
@dataclass
class UpdateRecord:
    """What one update did (for tests, the CLI and the fast backend's bookkeeping)."""
    injection_id: int
    dropped: torch.Tensor   # (L, T) logical STM positions dropped, as drawn (ascending)
    merged: bool
    pruned: list[int]       # per layer: tokens removed by pruning at this merge
    slots: torch.Tensor | None = None   # (L, T) physical STM slot each new row landed in (the op's answer)


def randperm_split(n: int, t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's drop draw: keep = perm[:n-t] sorted, drop = perm[n-t:] sorted."""
    perm = torch.randperm(n, generator=generator)
    return perm[: n - t].sort().values, perm[n - t:].sort().values


def tile_to(delta: torch.Tensor, n: int) -> torch.Tensor:
    """MemoryLLM's first write into an uninitialized memory: repeat `delta` (T, d) to n rows."""
    t = delta.shape[0]
    if t >= n:
        return delta[-n:]
    reps = [delta] * (n // t)
    if n % t:
        reps.append(delta[-(n % t):])
    return torch.cat(reps, dim=0)


def apply_update(state: MemoryState, config: MPlusConfig, delta: torch.Tensor, generator: torch.Generator,
                 key_fn: Callable[[int, torch.Tensor], torch.Tensor] | None, age_mode: str = "inference") -> UpdateRecord:
    """Write `delta` (L, T, d) into `state` (SPEC §5), in place: the store's update
    (`mplus_fast.store.update`) run over this state. `key_fn(l, rows)` = key_proj(input_layernorm(rows))."""
    from mplus_fast.store import NoDerived, update
    store = _store_of(state, config)
    record = update(store, delta, generator, NoDerived(key_fn), age_mode)
    _write_back(store, state)
    return record


def prune_decision(rf: torch.Tensor, R: int, decay: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decay recall frequencies; survivors (rf > 0.01) are kept only if more than R remain,
    otherwise the decay is undone and nothing is removed. Returns (new rf, survivors or None)."""
    decayed = rf - decay
    survivors = torch.nonzero(decayed > 0.01).flatten()
    if survivors.numel() > R:
        return decayed[survivors], survivors
    return decayed + decay, None


def merge_pending(state: MemoryState, config: MPlusConfig) -> list[int]:
    """Move the pending buffer into the LTM, decay recall frequencies, prune (SPEC §5), in place:
    the store's merge (`mplus_fast.store.merge`) run over this state."""
    from mplus_fast.store import merge
    store = _store_of(state, config)
    pruned = merge(store)
    _write_back(store, state)
    return pruned


def _store_of(state: MemoryState, config: MPlusConfig):
    from mplus_fast.store import MemoryStore, NoDerived, base_layout
    return MemoryStore.from_state(state, config, base_layout(config, state.stm.dtype, state.stm.device), NoDerived(None))


def _write_back(store, state: MemoryState) -> None:
    """`state`'s fields replaced by the store's rows (logical STM order, and the slot layout)."""
    view = store.view()
    for name in state.__dict__:
        setattr(state, name, getattr(view, name))

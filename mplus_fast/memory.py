"""The memory state of M+ / MemoryLLM and its update rules (SPEC §2, §5, §7).

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
    dropped: torch.Tensor   # (L, T) logical STM positions dropped, ascending
    merged: bool
    pruned: list[int]       # per layer: tokens removed by pruning at this merge


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
    """Write `delta` (L, T, d) into the memory (SPEC §5). `key_fn(l, rows)` = key_proj(input_layernorm(rows))."""
    if age_mode not in AGE_MODES:
        raise ValueError(f"age_mode={age_mode!r} is not one of {AGE_MODES}")
    L, T, _ = delta.shape
    N = state.stm.shape[1]
    inj = state.next_injection_id
    state.next_injection_id += 1

    if not state.initialized:  # MemoryLLM: the first write fills the whole pool
        state.stm = torch.stack([tile_to(delta[l], N) for l in range(L)]).to(state.stm.dtype)
        state.stm_ages.zero_()
        state.stm_prov.fill_(inj)
        state.initialized = True
        return UpdateRecord(inj, torch.empty(L, 0, dtype=torch.int64), False, [0] * L)

    new_ages = torch.arange(T - 1, -1, -1, dtype=torch.int64, device=state.stm_ages.device)
    stm, ages, prov, dropped_idx = [], [], [], []
    dropped_rows, dropped_ages, dropped_prov = [], [], []
    for l in range(L):
        if age_mode == "training":  # the reference's training code ages the STM before each drop
            state.stm_ages[l] += T
        keep, drop = randperm_split(N, T, generator)
        keep_d, drop_d = keep.to(state.stm.device), drop.to(state.stm.device)
        dropped_idx.append(drop)
        dropped_rows.append(state.stm[l, drop_d])
        dropped_ages.append(state.stm_ages[l, drop_d])
        dropped_prov.append(state.stm_prov[l, drop_d])
        stm.append(torch.cat([state.stm[l, keep_d], delta[l].to(state.stm.dtype)]))
        ages.append(torch.cat([state.stm_ages[l, keep_d], new_ages]))
        prov.append(torch.cat([state.stm_prov[l, keep_d], torch.full((T,), inj, dtype=torch.int64, device=state.stm_prov.device)]))
    state.stm, state.stm_ages, state.stm_prov = torch.stack(stm), torch.stack(ages), torch.stack(prov)
    record = UpdateRecord(inj, torch.stack(dropped_idx), False, [0] * L)
    if not config.is_mplus:
        return record

    # Everything already in the LTM or the pending buffer gets T older, then the dropped tokens
    # (with their STM ages and freshly computed retrieval keys) join the pending buffer.
    for l in range(L):
        state.ltm_ages[l] += T
        state.pend_ages[l] += T
        state.pend[l] = torch.cat([state.pend[l], dropped_rows[l]])
        state.pend_keys[l] = torch.cat([state.pend_keys[l], key_fn(l, dropped_rows[l]).to(state.pend_keys[l].dtype)])
        state.pend_ages[l] = torch.cat([state.pend_ages[l], dropped_ages[l]])
        state.pend_prov[l] = torch.cat([state.pend_prov[l], dropped_prov[l]])
    state.update_step += T
    if state.update_step >= config.update_ltm_frequency * config.num_tokens:
        record.merged = True
        record.pruned = merge_pending(state, config)
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
    """Move the pending buffer into the LTM, decay recall frequencies, prune (SPEC §5)."""
    R, decay = config.ltm_retrieved, float(config.decay_frequency)
    pruned = []
    for l in range(state.num_layers):
        c = state.pend[l].shape[0]
        rf_new = torch.full((c,), float(config.initial_rf_when_moving_stm_to_ltm), dtype=torch.float64, device=state.ltm_rf[l].device)
        ltm = torch.cat([state.ltm[l], state.pend[l].to(state.ltm[l].dtype)])
        keys = torch.cat([state.ltm_keys[l], state.pend_keys[l].to(state.ltm_keys[l].dtype)])
        ages = torch.cat([state.ltm_ages[l], state.pend_ages[l]])
        prov = torch.cat([state.ltm_prov[l], state.pend_prov[l]])
        rf, survivors = prune_decision(torch.cat([state.ltm_rf[l], rf_new]), R, decay)
        pruned.append(0 if survivors is None else ltm.shape[0] - survivors.numel())
        if survivors is not None:
            ltm, keys, ages, prov = ltm[survivors], keys[survivors], ages[survivors], prov[survivors]
        state.ltm[l], state.ltm_keys[l], state.ltm_ages[l], state.ltm_prov[l], state.ltm_rf[l] = ltm, keys, ages, prov, rf
        state.pend[l] = state.pend[l][:0]
        state.pend_keys[l] = state.pend_keys[l][:0]
        state.pend_ages[l] = state.pend_ages[l][:0]
        state.pend_prov[l] = state.pend_prov[l][:0]
    state.update_step = 0
    return pruned

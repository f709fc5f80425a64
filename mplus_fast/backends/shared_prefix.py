"""The batch-shared prefix [bos | STM] of every read, in the one form attention reads it: keys
rotated to their positions (bos at 0, the STM token at logical position i at R+1+i, SPEC §3) and
values, (L, Hkv, 1+N, D) each, the STM in slot order (attention over a fully visible prefix does
not care about row order). Prefill attends it as the first part of its log-sum-exp merge, and
every decode step attends it in place (`KVCache.shared`): no sequence's cache holds a copy.

This is the compute device's only copy of the STM K/V. The store keeps the pre-RoPE K/V column
it is made from (SPEC §5 moves a dropped row's K/V to the pending buffer unrotated); with the bank
on the host that column lives there too (pinned on a GPU). An update shifts almost every STM
token's position, so the rotated keys are rebuilt from the pre-RoPE column, layer by layer (one
layer's rows in flight), never re-rotated from their rotated form: rounding would accumulate over
injections.

The buffers are allocated once and rewritten in place, so a captured decode step keeps reading
the current memory; `version` counts the rebuilds, and a cache made before the last one refuses
to decode (`check`).
"""
from __future__ import annotations

import torch

from mplus_fast.rope import engine_rope as apply_rope   # the native kernel where measured faster


class SharedPrefix:
    def __init__(self):
        self.k: torch.Tensor | None = None     # (L, Hkv, 1+N, D) rotated keys
        self.v: torch.Tensor | None = None     # (L, Hkv, 1+N, D) values
        self.inv_freq: torch.Tensor | None = None
        self.version = 0
        self.stale = True

    def invalidate(self) -> None:
        """The STM changed (an update, another memory): rebuild at the next read."""
        self.stale = True

    def get(self, eng, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated [bos | STM] keys and values of every layer for RoPE frequencies `inv_freq`."""
        if self.stale or not torch.equal(self.inv_freq, inv_freq):
            self._build(eng, inv_freq)
        return self.k, self.v

    def layer(self, eng, l: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer l's part, shared by the whole batch: (1, Hkv, 1+N, D) keys and values (views)."""
        k, v = self.get(eng, inv_freq)
        return k[l][None], v[l][None]

    def check(self, version: int) -> None:
        if version != self.version:
            raise RuntimeError("this decode cache was made before the memory's [bos | STM] keys were rebuilt (a memory "
                               "update or another read with other RoPE frequencies since its prefill): prefill again")

    def _build(self, eng, inv_freq: torch.Tensor) -> None:
        c, stm, dev = eng.cfg, eng.store.stm, eng.m.device
        kv = stm.columns["kv"]                                                 # (L, N, 2, Hkv, D) by slot, pre-RoPE
        L, N, _, H, D = kv.shape
        if self.k is None or self.k.shape != (L, H, 1 + N, D) or self.k.dtype != kv.dtype or self.k.device != dev:
            self.k = torch.empty((L, H, 1 + N, D), dtype=kv.dtype, device=dev)
            self.v = torch.empty_like(self.k)
        order = stm.order_on(dev)
        pos = torch.empty_like(order)
        pos.scatter_(1, order, torch.arange(N, device=dev).expand_as(order))
        pos = pos + c.ltm_retrieved + 1                                        # (L, N) position of each slot
        for l in range(L):
            rows = kv[l].to(dev, non_blocking=True)                            # one layer's rows in flight
            bos = eng.bos_dec[l][0]                                            # (2, Hkv, D), RoPE at 0 = identity
            self.k[l, :, 0], self.v[l, :, 0] = bos[0], bos[1]
            self.k[l, :, 1:] = apply_rope(rows[:, 0].transpose(0, 1)[None], pos[l], inv_freq)[0]
            self.v[l, :, 1:] = rows[:, 1].transpose(0, 1)
        self.inv_freq = inv_freq.clone()
        self.stale = False
        self.version += 1

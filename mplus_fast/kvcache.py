"""The static key/value cache of generation (SPEC §4): filled at prefill with room for the tokens
to come, one slot written per decode step; `valid` masks left padding and unwritten slots.

The fast backend's cache holds only what differs per sequence ([LTM rows | prompt | new tokens]);
the batch-shared [bos | STM] prefix is attended in place (`shared`, views of the backend's one
rotated copy, `backends/shared_prefix.py`) and merged with the per-sequence part by log-sum-exp."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Static per-layer cache: keys after RoPE, values; `valid` marks attendable slots."""
    k: list[torch.Tensor]        # per layer (B, Hkv, capacity, D)
    v: list[torch.Tensor]
    length: list[int]            # filled slots per layer (equal across the batch)
    valid: list[torch.Tensor]    # per layer (B, capacity) bool
    next_pos: torch.Tensor       # (B,) int64 RoPE position of the next token
    # per layer (k, v) (1, Hkv, P_s, D) attended by every sequence besides its own slots, or empty
    shared: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    shared_version: int | None = None   # the version of the shared prefix it was made against

    def add_layer(self, k_parts, v_parts, key_valid, extra: int, shared=None) -> None:
        """Append one layer's prefill keys/values, the concatenation along the sequence of
        `k_parts` / `v_parts` (each (B or 1, Hkv, s_i, D)), with room for `extra` decoded tokens:
        each part is written straight into the static cache (no concatenation first, no zero fill
        of what is overwritten; the unwritten slots are zeroed, masked keys must not be NaN).
        `shared`: the layer's batch-shared (k, v) prefix, kept by reference (not copied)."""
        B, S = key_valid.shape
        H, D = k_parts[-1].shape[1], k_parts[-1].shape[3]
        kc, vc = k_parts[-1].new_empty(B, H, S + extra, D), v_parts[-1].new_empty(B, H, S + extra, D)
        start = 0
        for kp, vp in zip(k_parts, v_parts):
            n = kp.shape[2]
            kc[:, :, start:start + n], vc[:, :, start:start + n] = kp, vp
            start += n
        if start != S:
            raise ValueError(f"KVCache.add_layer: the parts hold {start} keys but key_valid has {S}")
        kc[:, :, S:].zero_()
        vc[:, :, S:].zero_()
        valid = torch.zeros(B, S + extra, dtype=torch.bool, device=kc.device)
        valid[:, :S] = key_valid
        self.k.append(kc)
        self.v.append(vc)
        self.valid.append(valid)
        self.length.append(S)
        if shared is not None:
            self.shared.append(shared)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write one decode step's k/v (B, Hkv, 1, D) into layer `layer`; returns the filled
        keys, values and valid mask (B, S+1) to attend over."""
        s = self.length[layer]
        self.k[layer][:, :, s:s + 1], self.v[layer][:, :, s:s + 1] = k, v
        self.valid[layer][:, s] = True
        self.length[layer] = s + 1
        return self.k[layer][:, :, : s + 1], self.v[layer][:, :, : s + 1], self.valid[layer][:, : s + 1]

    def write(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one decode step's k/v (B, Hkv, 1, D) at slot `slot` (a (1,) int64 tensor on the
        cache's device) and mark it attendable: no host synchronisation, no Python state, so a
        step built on it can be captured in a CUDA graph. `length`/`next_pos` are the caller's."""
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        self.valid[layer].index_fill_(1, slot, True)

    def advance(self) -> None:
        """Account for one step written with `write` in every layer."""
        self.length = [n + 1 for n in self.length]
        self.next_pos = self.next_pos + 1

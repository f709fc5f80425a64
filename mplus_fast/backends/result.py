"""What a read returns, whichever backend computed it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mplus_fast.kvcache import KVCache


@dataclass
class ReadResult:
    logits: torch.Tensor                 # (B, n, V) float32 (or (B, 1, V) when last_only)
    ltm_indices: list[torch.Tensor]      # per layer (B, R') placement order, [LTM; pending] numbering
    ltm_provenance: list[torch.Tensor]   # per layer (B, R') injection ids of those rows
    cache: KVCache | None

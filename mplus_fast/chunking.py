"""Splitting a long document into injections (SPEC §5): chunks of about T tokens, never a tiny tail.

Every injection writes T new memory tokens whatever its length m, computed from the last T
positions of [bos | last T STM tokens | chunk]: a chunk much shorter than T is mostly old memory
re-encoded, and the authors' README asks for contexts of at least 16 tokens. So a document is cut
into chunks of `chunk_tokens` (default T) and a tail shorter than `min_tokens` is joined to the
chunk before it (an injection may be longer than T: all its tokens are read).
"""
from __future__ import annotations

import torch

MIN_CONTEXT_TOKENS = 16   # the authors' README: contexts of at least 16 tokens


def chunk_sizes(n: int, chunk_tokens: int, min_tokens: int = MIN_CONTEXT_TOKENS) -> list[int]:
    """Lengths of the chunks `n` tokens are cut into (they sum to n)."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens={min_tokens!r} must be a positive integer")
    if n <= 0:
        return []
    sizes = [chunk_tokens] * (n // chunk_tokens)
    tail = n % chunk_tokens
    if tail:
        if sizes and tail < min(min_tokens, chunk_tokens):
            sizes[-1] += tail
        else:
            sizes.append(tail)
    return sizes


def chunk_ids(ids: torch.Tensor, chunk_tokens: int, min_tokens: int = MIN_CONTEXT_TOKENS) -> list[torch.Tensor]:
    """A 1-D tensor of token ids cut into injections (views), see `chunk_sizes`."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"chunk_ids: ids must be a 1-D tensor of token ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    return list(torch.split(ids, chunk_sizes(ids.shape[0], chunk_tokens, min_tokens)))

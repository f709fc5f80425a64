"""Choosing the next token from logits (SPEC §4), Hugging Face `generate` order:
logits → temperature → top-k → top-p → sample (or argmax when greedy).

Sampling draws from the model's own CPU generator like `torch.multinomial(probs, 1)`, which for
one sample draws q ~ Exp(1) of the probabilities' shape and returns argmax(probs / q):
`exponential_noise` makes exactly those draws, so the device can do the argmax itself
(`decoding.StaticDecoder`) with the same tokens and the same generator state afterwards.
"""
from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (B, V) float32 → filtered logits (masked entries −inf), HF warper order."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator: torch.Generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def exponential_noise(shape, generator: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Exp(1) draws `torch.multinomial(probs, 1, generator)` makes for float32 probs `shape`."""
    out = torch.empty(shape, dtype=torch.float32) if out is None else out
    return out.exponential_(1, generator=generator)

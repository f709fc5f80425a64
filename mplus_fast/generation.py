"""Token generation (SPEC §4): one prefill over the memory, then cached decode steps.

Decoding follows Hugging Face `generate`: logits → temperature → top-k → top-p → sample (or
argmax when greedy); a sequence that produced an end-of-sequence id is finished and padded with
the pad id from then on; generation stops at `max_new_tokens` or when all are finished. Sampling
draws from the model's own generator, so seeded runs repeat exactly.
"""
from __future__ import annotations

import torch


def resolve_eos(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos_token_id is None:
        return []
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < model.config.vocab_size:
            raise ValueError(f"eos_token_id {i!r} is not a token id in [0, {model.config.vocab_size})")
    return ids


def resolve_pad(model, pad_token_id, eos: list[int]) -> int:
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id", model.config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return int(pad_token_id)


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


def check_options(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0 when sampling")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k={top_k!r} must be a non-negative integer")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id=None, pad_token_id: int | None = None) -> torch.Tensor:
    """Returns (B, n + generated) token ids: the prompt followed by the new tokens."""
    check_options(max_new_tokens, do_sample, temperature, top_k, top_p)
    ids = model._check_ids(input_ids, "input_ids")
    valid = model._check_mask(attention_mask, ids)
    eos = resolve_eos(model, eos_token_id)
    pad = resolve_pad(model, pad_token_id, eos)
    if max_new_tokens == 0:
        return ids
    res = model.backend.read(ids, valid, cache_extra=max_new_tokens, last_only=True)
    cache = res.cache
    logits = res.logits[:, -1]
    eos_t = torch.tensor(eos, dtype=torch.long, device=ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = [ids]
    for step in range(max_new_tokens):
        tok = next_tokens(logits, do_sample, temperature, top_k, top_p, model.generator)
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        out.append(tok[:, None])
        if eos:
            finished = finished | torch.isin(tok, eos_t)
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits = model.backend.decode_step(cache, tok)
    return torch.cat(out, dim=1)

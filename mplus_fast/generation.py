"""Token generation (SPEC §4): one prefill over the memory, then cached decode steps.

Decoding follows Hugging Face `generate`: logits → temperature → top-k → top-p → sample (or
argmax when greedy); a sequence that produced an end-of-sequence id is finished and padded with
the pad id from then on; generation stops at `max_new_tokens` or when all are finished. Sampling
draws from the model's own generator, so seeded runs repeat exactly.

Two loops with the same results: the fast backend decodes with `decoding.StaticDecoder` (device
state, CUDA graph on a GPU) whenever the RoPE frequencies stay fixed over the steps; otherwise
(and for the reference backend) the plain loop below runs one `decode_step` per token.
"""
from __future__ import annotations

import math
import warnings

import torch

from mplus_fast.decoding import StaticDecoder
from mplus_fast.inputs import IgnoredOptionWarning, check_count, check_flag, check_token_id
from mplus_fast.sampling import next_tokens


def resolve_eos(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos_token_id is None:
        return []
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    for i in ids:
        check_token_id(i, "eos_token_id", model.config.vocab_size)
    return ids


def resolve_pad(model, pad_token_id, eos: list[int]) -> int:
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id", model.config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return check_token_id(pad_token_id, "pad_token_id", model.config.vocab_size)


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": None}


def check_options(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    """Types always; ranges when sampling. Sampling options given without do_sample=True are
    ignored with an IgnoredOptionWarning, as Hugging Face `generate` does (greedy decoding)."""
    check_count(max_new_tokens, "max_new_tokens")
    check_flag(do_sample, "do_sample")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature={temperature!r} must be a number")
    if top_k is not None:
        check_count(top_k, "top_k")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))):
        raise TypeError(f"top_p={top_p!r} must be a number or None")
    if not do_sample:
        given = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
                 if v != SAMPLING_DEFAULTS[k]}
        if given:
            one = len(given) == 1
            warnings.warn(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} {'has' if one else 'have'} no effect "
                          f"without do_sample=True (CLI: --sample): decoding is greedy; sample, or leave "
                          f"{'it' if one else 'them'} out", IgnoredOptionWarning, stacklevel=5)
        return
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 when sampling")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id=None, pad_token_id: int | None = None, retrieve: bool = True) -> torch.Tensor:
    """Returns (B, n + generated) token ids: the prompt followed by the new tokens.
    `retrieve=False`: the prompt reads the short-term memory only (see `MPlus.forward`)."""
    check_options(max_new_tokens, do_sample, temperature, top_k, top_p)
    check_flag(retrieve, "retrieve")
    ids, valid = model._check_input(input_ids, attention_mask, "input_ids", new_tokens=max_new_tokens)
    eos = resolve_eos(model, eos_token_id)
    pad = resolve_pad(model, pad_token_id, eos)
    if max_new_tokens == 0:
        return ids
    res = model.backend.read(ids, valid, cache_extra=max_new_tokens, last_only=True, retrieve=retrieve)
    if use_static_decoder(model, res.cache, max_new_tokens):
        inv_freq = model.rope.inv_freq_for(int(res.cache.next_pos.max()))
        decoder = StaticDecoder(model.backend, res.cache, inv_freq, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos=eos, pad=pad,
                                generator=model.generator)
        return torch.cat([ids, decoder.run(res.logits[:, -1])], dim=1)
    return torch.cat([ids, step_loop(model, res.cache, res.logits[:, -1], max_new_tokens, do_sample, temperature,
                                     top_k, top_p, eos, pad)], dim=1)


def use_static_decoder(model, cache, max_new_tokens: int) -> bool:
    """The backend can decode with device-side state, and RoPE stays fixed over all steps."""
    if not hasattr(model.backend, "decode_forward"):
        return False
    first = int(cache.next_pos.max())
    return model.rope.fixed_over(first, first + max_new_tokens - 2)


def step_loop(model, cache, logits, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad) -> torch.Tensor:
    """The plain loop: choose on the host, one `decode_step` per token. Returns (B, k) new ids."""
    B, dev = logits.shape[0], logits.device
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    out = []
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

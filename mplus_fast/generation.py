"""Token generation (SPEC §4): one prefill over the memory, then cached decode steps.

Decoding follows Hugging Face `generate`: logits → temperature → top-k → top-p → sample (or
argmax when greedy); a sequence that produced an end-of-sequence id is finished and padded with
the pad id from then on; generation stops at `max_new_tokens` or when all are finished. Sampling
draws from the model's own generator, so seeded runs repeat exactly.

Two loops with the same results: the fast backend decodes with `decoding.StaticDecoder` (device
state, CUDA graph on a GPU) whenever the RoPE frequencies stay fixed over the steps, reusing the
decoder captured by an earlier call of the same shape (`decoding.DecoderCache`); otherwise
(and for the reference backend) the plain loop below runs one `decode_step` per token.
"""
from __future__ import annotations

import math

import torch

from mplus_fast.decoding import StaticDecoder, decoder_cache, decoder_key
from mplus_fast.hf.options import resolve as resolve_options
from mplus_fast.inputs import IgnoredOptionWarning, check_count, check_flag, check_token_id, warn_at_caller
from mplus_fast.hf.stopping import StopStrings
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


# Values that leave greedy decoding alone: unset, or Hugging Face's library defaults (which a
# transformers GenerationConfig brings along).
NEUTRAL_SAMPLING = {"temperature": (1.0,), "top_k": (None, 50), "top_p": (None, 1.0)}


def check_options(max_new_tokens, do_sample, temperature, top_k, top_p, warn: bool = True) -> None:
    """Types always; ranges when sampling. Sampling options given without do_sample=True are
    ignored with an IgnoredOptionWarning (unless `warn=False`: a check ahead of the call that
    will warn), as Hugging Face `generate` does (greedy decoding)."""
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
                 if v not in NEUTRAL_SAMPLING[k]}
        if given and warn:
            one = len(given) == 1
            warn_at_caller(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} {'has' if one else 'have'} no effect "
                          f"without do_sample=True (CLI: --sample): decoding is greedy; sample, or leave "
                          f"{'it' if one else 'them'} out", IgnoredOptionWarning)
        return
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 when sampling")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


@torch.inference_mode()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             eos_token_id=None, pad_token_id: int | None = None, retrieve: bool = True, generation_config=None,
             streamer=None, stop_strings=None, tokenizer=None) -> torch.Tensor:
    """Returns (B, n + generated) token ids: the prompt followed by the new tokens.
    `retrieve=False`: the prompt reads the short-term memory only (see `MPlus.forward`).
    Options resolve as in Hugging Face: the checkpoint's generation_config.json, then
    `generation_config` (a transformers GenerationConfig or a dict), then these keyword arguments
    (`mplus_fast.hf.options`). `streamer`: an object with `put(ids)` / `end()` (ours in
    `mplus_fast.hf.streamers`, or transformers'). `stop_strings` end a sequence once its new
    text contains one (needs `tokenizer`, default the model's)."""
    check_flag(retrieve, "retrieve")
    ids = model._check_ids(input_ids, "input_ids")
    valid = model._check_mask(attention_mask, ids)
    o = resolve_options(model.generation_config, generation_config, dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings), ids.shape[1])
    check_options(o.max_new_tokens, o.do_sample, o.temperature, o.top_k, o.top_p)
    model._check_read(ids, valid, "input_ids", new_tokens=o.max_new_tokens)
    eos = resolve_eos(model, o.eos_token_id)
    pad = resolve_pad(model, o.pad_token_id, eos)
    if streamer is not None and ids.shape[0] != 1:
        raise ValueError(f"streamer: streaming supports a batch of one sequence, got {ids.shape[0]}")
    stops = StopStrings(tokenizer or getattr(model, "tokenizer", None), o.stop_strings, ids.shape[0]) if o.stop_strings else None
    on_step = step_hook(streamer, stops)
    if streamer is not None:
        streamer.put(ids.cpu())
    try:
        new = _generate_new(model, ids, valid, o, eos, pad, retrieve, on_step)
    finally:
        if streamer is not None:
            streamer.end()
    return torch.cat([ids, new], dim=1)


def _generate_new(model, ids, valid, o, eos, pad, retrieve, on_step) -> torch.Tensor:
    if o.max_new_tokens == 0:
        return ids[:, :0]
    res = model.backend.read(ids, valid, cache_extra=o.max_new_tokens, last_only=True, retrieve=retrieve)
    if use_static_decoder(model, res.cache, o.max_new_tokens):
        inv_freq = model.rope.inv_freq_for(int(res.cache.next_pos.max()))
        captured = decoder_cache(model.backend)
        key = decoder_key(res.cache, o.max_new_tokens, o.do_sample, o.temperature, o.top_k, o.top_p, eos, pad)
        decoder = captured.take(key)       # this shape's captured step, from an earlier call
        if decoder is not None:
            decoder.restart(res.cache, inv_freq, model.generator, on_step)
        else:
            decoder = StaticDecoder(model.backend, res.cache, inv_freq, max_new_tokens=o.max_new_tokens,
                                    do_sample=o.do_sample, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                                    eos=eos, pad=pad, generator=model.generator, on_step=on_step)
        new = decoder.run(res.logits[:, -1])
        captured.keep(decoder)
        return new
    return step_loop(model, res.cache, res.logits[:, -1], o.max_new_tokens, o.do_sample, o.temperature,
                     o.top_k, o.top_p, eos, pad, on_step)


def step_hook(streamer, stops):
    """One per-step callback for the decoders: tokens (B,) → (B,) bool to finish now, or None."""
    if streamer is None and stops is None:
        return None

    def on_step(tokens: torch.Tensor):
        tokens = tokens.cpu()
        if streamer is not None:
            streamer.put(tokens)
        return stops(tokens) if stops is not None else None
    return on_step


def use_static_decoder(model, cache, max_new_tokens: int) -> bool:
    """The backend can decode with device-side state, and RoPE stays fixed over all steps."""
    if not hasattr(model.backend, "decode_forward"):
        return False
    first = int(cache.next_pos.max())
    return model.rope.fixed_over(first, first + max_new_tokens - 2)


def step_loop(model, cache, logits, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad, on_step=None) -> torch.Tensor:
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
        stop = on_step(tok) if on_step is not None else None
        if stop is not None:
            finished = finished | stop.to(dev)
        if (eos or stop is not None) and bool(finished.all()):
            break
        if step + 1 < max_new_tokens:
            logits = model.backend.decode_step(cache, tok)
    return torch.cat(out, dim=1)

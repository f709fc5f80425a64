"""Text in, text out: the public text API of `MPlus` (`complete`, `chat`, `inject_text`).

The model's tokenizer (`model.tokenizer`, loaded with the checkpoint when its folder has one, see
`mplus_fast.hf.tokenizer`) turns text into ids without the tokenizer's BOS (M+ has its own), a
chat is rendered with the folder's chat template, documents are cut into injections of about T
tokens with no tiny tail (`mplus_fast.chunking`), and answers are decoded, cut before a stop
string as the OpenAI API does. `TextDeltas` turns a generation into text pieces for streaming
without ever sending text that a stop string later removes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mplus_fast.chunking import chunk_ids
from mplus_fast.hf.stopping import cut_at_stop


@dataclass
class Completion:
    text: str                    # the answer (cut before a stop string)
    token_ids: list[int]         # the new tokens (including the one that completed a stop string)
    prompt_tokens: int
    finish_reason: str           # "stop" (end-of-sequence id or stop string) or "length"
    recalled: dict[int, int] = field(default_factory=dict)   # injection id → retrieved rows (all layers)


def need_tokenizer(model, tokenizer=None):
    tok = tokenizer or getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer: its checkpoint folder holds no tokenizer.json; pass "
                         "tokenizer=mplus_fast.hf.load_tokenizer(PATH) or set model.tokenizer")
    return tok


def encode_prompt(model, text: str, tokenizer=None) -> torch.Tensor:
    tok = need_tokenizer(model, tokenizer)
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to zero tokens")
    return torch.tensor(ids, dtype=torch.long, device=model.device)


def complete_ids(model, ids: torch.Tensor, *, tokenizer=None, streamer=None, stop_strings=None,
                 recall: bool = False, **gen) -> Completion:
    """Generate after the prompt ids (n,) and decode the answer."""
    tok = need_tokenizer(model, tokenizer)
    out = model.generate(ids[None], streamer=streamer, stop_strings=stop_strings, tokenizer=tok, **gen)
    new = out[0, ids.shape[0]:].tolist()
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    eos = set(_eos_ids(model, gen.get("eos_token_id")))
    ended = next((i for i, t in enumerate(new) if t in eos), None)
    if ended is not None:
        new = new[:ended + 1]
    text, stopped = cut_at_stop(tok.decode(new), stops)
    recalled = model(ids[None]).recalled_injections() if recall else {}
    return Completion(text, new, ids.shape[0], "stop" if ended is not None or stopped else "length", recalled)


def _eos_ids(model, eos_token_id) -> list[int]:
    from mplus_fast.generation import resolve_eos
    return resolve_eos(model, eos_token_id)


def complete(model, prompt: str, **kw) -> Completion:
    return complete_ids(model, encode_prompt(model, prompt, kw.get("tokenizer")), **kw)


def chat(model, messages: list[dict], **kw) -> Completion:
    tok = need_tokenizer(model, kw.get("tokenizer"))
    return complete(model, tok.apply_chat_template(messages, add_generation_prompt=True), **kw)


def inject_text(model, text: str, *, chunk_tokens: int | None = None, tokenizer=None) -> list[int]:
    """Inject a document in chunks of about `chunk_tokens` (default T) tokens, never a tiny tail;
    returns the injection id of each chunk (what `out.recalled_injections()` reports)."""
    ids = encode_prompt(model, text, tokenizer)
    return inject_ids(model, ids, chunk_tokens=chunk_tokens)


def inject_ids(model, ids: torch.Tensor, *, chunk_tokens: int | None = None) -> list[int]:
    chunks = chunk_ids(ids, chunk_tokens or model.config.num_tokens)
    out = []
    for chunk in chunks:
        model.inject_memory(chunk.to(model.device), update_memory=True)
        out.append(model.last_update.injection_id)
    return out


class TextDeltas:
    """A streamer (`put` / `end`) that calls `on_delta(text)` with each new piece of the answer.
    Text that might be the start of a stop string is held back until it is known not to be one,
    and nothing after a stop string is ever sent."""

    def __init__(self, tokenizer, stop_strings, on_delta):
        self.tok = tokenizer
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.on_delta = on_delta
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        if not self.stopped:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tok.decode(self.ids)
        text, self.stopped = cut_at_stop(text, self.stops)
        if not final and not self.stopped:
            if text.endswith("\ufffd"):
                return
            text = text[:max(len(text) - self.hold, self.sent)]
        if len(text) > self.sent:
            self.on_delta(text[self.sent:])
            self.sent = len(text)

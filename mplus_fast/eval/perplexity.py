"""Perplexity of held-out prose with and without the memory of the text before it.

Per example: a random place in one of the books; the `memory_tokens` tokens before it are
injected chunk by chunk (`chunk_tokens`, default T), then the next `eval_tokens` tokens are read
in one forward and scored (every token but the first, which has nothing before it in the read).
`mplus` and `stm` read over that memory; `borderline` reads the same tokens on a fresh memory.
Perplexity = exp(total negative log-likelihood / scored tokens), per mode.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

from mplus_fast.eval import books
from mplus_fast.eval.runner import book_todo, failed_keys, finish, prepare, run_examples
from mplus_fast.eval.session import MODE_LABELS, ModelSource, check_modes, inject_text, read_mode, token_logprobs

TASK = "perplexity"


@dataclass
class Settings:
    memory_tokens: int = 1024
    eval_tokens: int = 128
    modes: tuple[str, ...] = ("mplus", "stm", "borderline")
    chunk_tokens: int = 0

    def __post_init__(self):
        if self.memory_tokens < 1 or self.eval_tokens < 2:
            raise ValueError(f"memory_tokens={self.memory_tokens} must be >= 1 and eval_tokens={self.eval_tokens} >= 2")
        self.modes = check_modes(self.modes)


def run_example(source: ModelSource, tokenizer, index: int, s: Settings, modes: tuple[str, ...], seed: int) -> dict:
    rng = random.Random(f"ppl:{seed}:{index}")
    book = books.book_names()[index % len(books.book_names())]
    sents = books.haystack_ids(tokenizer, book, s.memory_tokens + s.eval_tokens, rng)
    ids = [t for sent in sents for t in sent]
    before, held_out = ids[: s.memory_tokens], ids[s.memory_tokens: s.memory_tokens + s.eval_tokens]
    model = source.fresh(index)
    out = {"key": f"{index}:{book}", "index": index, "book": book, "scored_tokens": len(held_out) - 1}
    nll = lambda mode: -sum(token_logprobs(model, [], held_out, retrieve=read_mode(mode))[0])
    if "borderline" in modes:
        out["borderline"] = {"nll": nll("borderline")}
    out["injections"] = len(inject_text(model, before, s.chunk_tokens))
    for mode in (m for m in modes if m != "borderline"):
        out[mode] = {"nll": nll(mode)}
    return out


def run(source: ModelSource, tokenizer, n: int = 20, settings: Settings | None = None, *, seed: int = 0, out=None,
        restart: bool = False, progress: bool = True) -> dict:
    s = settings or Settings()
    store, modes = prepare(source, tokenizer, TASK, {**asdict(s), "seed": seed}, s.modes, out, restart)
    todo = book_todo(n, lambda i: (source, tokenizer, i, s, modes, seed))
    started = time.perf_counter()
    running = lambda rec: {MODE_LABELS[m]: math.exp(rec[m]["nll"] / rec["scored_tokens"]) for m in modes}
    records = run_examples(todo, run_example, store, "perplexity", running, progress)
    ok = [r for r in records if "error" not in r]
    tokens = sum(r["scored_tokens"] for r in ok)
    summary = {"examples": len(ok), "failed": failed_keys(records), "scored_tokens": tokens,
               **{m: {"ppl": round(math.exp(sum(r[m]["nll"] for r in ok) / tokens), 4) if tokens else None} for m in modes}}
    return finish(store, summary, records, started)

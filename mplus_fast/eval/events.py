"""Planted-event multiple choice, LongBook style (InfiniteBench's En.MC asks a question about a
long novel with four options): an invented event is planted at a random depth of `length`
tokens of one book's prose; after the whole text is injected, the question is asked with four
options (the true value and three others of the same kind, in random order):

    Where does Gideon Larkspur keep the tin whistle?
    A. in the hat box
    B. in the linen chest
    ...
    Answer:

and the choice is the option with the highest log-likelihood as the continuation " <option>"
(the sum over its tokens; `acc`), or per character (`acc_norm`, as lm-evaluation-harness).
Each option is one read of prompt + option, so retrieval sees the option too. Modes as everywhere:
`mplus`, `stm` over the memory, `borderline` on a fresh one; recall@R of the event's
injection(s) from the read of the prompt.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from mplus_fast.eval import books
from mplus_fast.eval.runner import book_todo, failed_keys, finish, mean, prepare, run_examples
from mplus_fast.eval.session import (MODE_LABELS, ModelSource, check_modes, inject_marked, locate, read_mode,
                                     recall_by_layer, token_logprobs)

TASK = "events"
LETTERS = "ABCD"


@dataclass
class Settings:
    length: int = 2048
    modes: tuple[str, ...] = ("mplus", "stm", "borderline")
    chunk_tokens: int = 0
    locate: bool = True

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length={self.length} must be a positive token count")
        self.modes = check_modes(self.modes)


def make_question(rng: random.Random) -> tuple[str, str, list[str], int]:
    """(event sentence, question, four options, index of the true one)."""
    kind, values = books.draw_fact(rng)
    truth = kind.answer.format(**values)
    pool = [v for v in books.SLOT_VALUES[kind.slot] if kind.answer.format(**{**values, kind.slot: v}) != truth]
    others = [kind.answer.format(**{**values, kind.slot: v}) for v in rng.sample(pool, 3)]
    options = others + [truth]
    rng.shuffle(options)
    return kind.sentence.format(**values), kind.question.format(**values), options, options.index(truth)


def prompt_text(question: str, options: list[str]) -> str:
    return question + "\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options)) + "Answer:"


def choose(model, prompt_ids, option_ids, mode: str) -> dict:
    scores = [sum(token_logprobs(model, prompt_ids, ids, retrieve=read_mode(mode))[0]) for ids in option_ids]
    return {"logprobs": [round(x, 4) for x in scores]}


def run_example(source: ModelSource, tokenizer, index: int, s: Settings, modes: tuple[str, ...], seed: int) -> dict:
    rng = random.Random(f"events:{seed}:{index}")
    event, question, options, truth = make_question(rng)
    event_ids = tokenizer.encode(" " + event)
    book = books.book_names()[index % len(books.book_names())]
    hay = books.haystack_ids(tokenizer, book, max(s.length - len(event_ids), 1), rng)
    ids, offset = books.insert_at_depth(hay, event_ids, rng.random())
    prompt = tokenizer.encode(prompt_text(question, options))
    option_ids = [tokenizer.encode(" " + o) for o in options]
    lengths = [len(o) for o in options]
    model = source.fresh(index)
    out = {"key": f"{index}:{book}", "index": index, "book": book, "question": question, "options": options,
           "truth": truth, "depth": round(offset / max(len(ids), 1), 3)}

    def decide(mode):
        r = choose(model, prompt, option_ids, mode)
        norm = [lp / n for lp, n in zip(r["logprobs"], lengths)]
        r["acc"] = float(max(range(4), key=r["logprobs"].__getitem__) == truth)
        r["acc_norm"] = float(max(range(4), key=norm.__getitem__) == truth)
        return r

    if "borderline" in modes:
        out["borderline"] = decide("borderline")
    targets = inject_marked(model, ids, offset, len(event_ids), s.chunk_tokens)
    out["event_injections"] = targets
    if s.locate and source.is_mplus:
        out["location"] = locate(model, targets)
    for mode in (m for m in modes if m != "borderline"):
        out[mode] = decide(mode)
    if "mplus" in modes and source.is_mplus:
        prov = model(_tensor(model, prompt)).ltm_provenance
        out["mplus"]["recall"], out["mplus"]["share"], _ = recall_by_layer(prov, targets)
    return out


def _tensor(model, ids):
    import torch
    return torch.tensor(ids, dtype=torch.long, device=model.device)[None]


def run(source: ModelSource, tokenizer, n: int = 50, settings: Settings | None = None, *, seed: int = 0, out=None,
        restart: bool = False, progress: bool = True) -> dict:
    s = settings or Settings()
    store, modes = prepare(source, tokenizer, TASK, {**asdict(s), "seed": seed}, s.modes, out, restart)
    todo = book_todo(n, lambda i: (source, tokenizer, i, s, modes, seed))
    started = time.perf_counter()
    running = lambda rec: {MODE_LABELS[m]: rec[m]["acc"] for m in modes}
    records = run_examples(todo, run_example, store, "events", running, progress)
    ok = [r for r in records if "error" not in r]
    summary = {"examples": len(ok), "failed": failed_keys(records), "chance": 0.25,
               **{m: {"acc": mean(r[m]["acc"] for r in ok), "acc_norm": mean(r[m]["acc_norm"] for r in ok)} for m in modes}}
    rec = [r for r in ok if r.get("mplus", {}).get("recall") is not None]
    if rec:
        summary["recall_any_layer"] = mean(float(any(r["mplus"]["recall"])) for r in rec
                                           if "location" not in r or any(sum(l[1:]) > 0 for l in r["location"]))
    return finish(store, summary, records, started)

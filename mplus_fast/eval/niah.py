"""Needle in a haystack over a depth × length grid, on the public-domain books.

For every (length, depth, sample): a haystack of `length` tokens of consecutive prose (the books
in turn), a needle sentence "The secret code of <name> is <4 digits>." placed between sentences
at `depth` (0 = start, 1 = end), the whole injected chunk by chunk (`chunk_tokens`, default T);
then the question "What is the secret code of <name>? The secret code of <name> is" is read and
answered greedily; the score is the string match of the four digits in the answer. Modes:
`mplus` and `stm` over that memory, `borderline` the question on a fresh memory. For `mplus`,
recall@R of the injection(s) holding the needle, by layer.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from mplus_fast.eval import books, metrics
from mplus_fast.eval.runner import failed_keys, finish, mean, prepare, run_examples
from mplus_fast.eval.session import MODE_LABELS, ModelSource, ask, check_modes, inject_marked, locate

TASK = "niah"


@dataclass
class Settings:
    lengths: tuple[int, ...] = (256, 1024, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 2                       # haystacks per grid cell
    modes: tuple[str, ...] = ("mplus", "stm", "borderline")
    chunk_tokens: int = 0
    max_new_tokens: int = 8
    locate: bool = True

    def __post_init__(self):
        self.lengths = tuple(sorted(set(int(n) for n in self.lengths)))
        self.depths = tuple(sorted(set(float(d) for d in self.depths)))
        if not self.lengths or self.lengths[0] < 1:
            raise ValueError(f"lengths {self.lengths} must be positive token counts")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths {self.depths} must lie within [0, 1]")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples} must be at least 1")
        self.modes = check_modes(self.modes)


def grid(s: Settings) -> list[tuple[int, float, int]]:
    return [(n, d, k) for n in s.lengths for d in s.depths for k in range(s.samples)]


def run_example(source: ModelSource, tokenizer, index: int, cell: tuple[int, float, int], s: Settings,
                modes: tuple[str, ...], seed: int) -> dict:
    length, depth, sample = cell
    rng = random.Random(f"niah:{seed}:{length}:{depth}:{sample}")
    name, code = f"{rng.choice(books.FIRST_NAMES)} {rng.choice(books.SURNAMES)}", f"{rng.randrange(1000, 10000)}"
    needle = tokenizer.encode(f" The secret code of {name} is {code}.")
    book = books.book_names()[index % len(books.book_names())]
    hay = books.haystack_ids(tokenizer, book, max(length - len(needle), 1), rng)
    ids, offset = books.insert_at_depth(hay, needle, depth)
    question = tokenizer.encode(f"What is the secret code of {name}? The secret code of {name} is")
    model = source.fresh(index)
    kw = dict(max_new_tokens=s.max_new_tokens, eos_ids=tokenizer.eos_ids)
    out = {"key": f"{index}:L{length}-d{depth}-s{sample}", "index": index, "length": length, "depth": depth,
           "book": book, "code": code, "tokens": len(ids)}
    if "borderline" in modes:
        a = ask(model, question, tokenizer, mode="borderline", **kw)
        out["borderline"] = {"text": a.text, "hit": metrics.hit(a.text, code)}
    targets = inject_marked(model, ids, offset, len(needle), s.chunk_tokens)
    out["needle_injections"] = targets
    if s.locate and source.is_mplus:
        out["location"] = locate(model, targets)
    for mode in (m for m in modes if m != "borderline"):
        a = ask(model, question, tokenizer, mode=mode, targets=targets, **kw)
        out[mode] = {**a.to_json(), "hit": metrics.hit(a.text, code)}
    return out


def run(source: ModelSource, tokenizer, settings: Settings | None = None, *, seed: int = 0, out=None,
        limit: int | None = None, restart: bool = False, progress: bool = True) -> dict:
    """`limit`: the first N cells of the grid (length-major)."""
    s = settings or Settings()
    store, modes = prepare(source, tokenizer, TASK, {**asdict(s), "seed": seed}, s.modes, out, restart)
    todo = [(i, f"{i}:L{c[0]}-d{c[1]}-s{c[2]}", (source, tokenizer, i, c, s, modes, seed)) for i, c in enumerate(grid(s))][:limit]
    started = time.perf_counter()
    running = lambda rec: {MODE_LABELS[m]: rec[m]["hit"] for m in modes}
    records = run_examples(todo, run_example, store, "niah", running, progress)
    return finish(store, summarize(records, s, modes), records, started)


def summarize(records: list[dict], s: Settings, modes: tuple[str, ...]) -> dict:
    ok = [r for r in records if "error" not in r]
    grids = {m: {str(d): {str(n): mean(r[m]["hit"] for r in ok if r["depth"] == d and r["length"] == n)
                          for n in s.lengths} for d in s.depths} for m in modes}
    by_length = {m: {str(n): mean(r[m]["hit"] for r in ok if r["length"] == n) for n in s.lengths} for m in modes}
    out = {"examples": len(ok), "failed": failed_keys(records), "grid": grids, "by_length": by_length,
           "overall": {m: mean(r[m]["hit"] for r in ok) for m in modes}}
    with_recall = [r for r in ok if r.get("mplus", {}).get("recall") is not None]
    if with_recall:
        retrievable = [r for r in with_recall if "location" not in r or any(sum(loc[1:]) > 0 for loc in r["location"])]
        out["recall_any_layer_by_length"] = {str(n): mean(float(any(r["mplus"]["recall"])) for r in retrievable
                                                          if r["length"] == n) for n in s.lengths}
    return out

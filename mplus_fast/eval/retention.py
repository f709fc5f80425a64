"""Knowledge retention vs distance: a context carrying a fact, then D distractor injections, then
the question. Accuracy (EM, QA-F1 and the authors' exact hit) by distance for M+, STM only and
the borderline, and retrieval diagnostics: for every question, whether each layer recalled the
injection that holds the answer (recall@R by layer and distance).

Protocol, per example (a `mplus_fast.qa.QARecord`), on a fresh memory (`session.ModelSource`):
1. borderline: the question alone, before anything is injected;
2. the context (`context_template`) is injected, cut into chunks of `chunk_tokens` (default
   the model's T; a long context makes several injections: all of them are "the fact");
3. distractor texts are injected, each cut the same way, one chunk = one injection; after
   exactly D distractor injections, for every D in `distances`, the question
   (`question_template`) is asked in the `mplus` and `stm` modes over the same memory;
4. each answer is the greedy continuation (`max_new_tokens`, stopped at end-of-sequence), cut
   by `postprocess` (default: its first line), scored against every accepted answer.
Distance is counted in injections (and reported in tokens: the distractor tokens injected after
the context). recall@R at layer l: the share of questions whose read at layer l retrieved at
least one row written by the context, among the questions for which such a row was in the
long-term memory or the pending buffer at that moment (`locate`); rows still in the STM need no
retrieval.

Python use (the records may come from any source of qa.py records):

    from mplus_fast.eval import retention, session
    from mplus_fast.qa import read_jsonl
    source = session.ModelSource.from_pretrained("ckpt/")
    result = retention.run(source, tokenizer, list(read_jsonl("facts.jsonl")),
                           retention.Settings(distances=(0, 8, 32, 64)))
    result["summary"]["by_distance"]     # per distance: EM/F1/hit per mode, recall@R
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Protocol, Sequence

from mplus_fast.eval import metrics
from mplus_fast.eval.runner import failed_keys, finish, mean, prepare, run_examples
from mplus_fast.eval.session import (MODE_LABELS, ModelSource, ask, check_modes, inject_chunk,
                                     chance_recall, inject_text, locate, split_ids)
from mplus_fast.qa import QARecord

TASK = "retention"


@dataclass
class Settings:
    distances: tuple[int, ...] = (0, 1, 2, 4, 8)
    modes: tuple[str, ...] = ("mplus", "stm", "borderline")
    max_new_tokens: int = 16
    postprocess: str = "first-line"
    chunk_tokens: int = 0                 # 0: the model's T
    context_template: str = "{context}"
    question_template: str = "{question}"
    locate: bool = True                   # where the fact's rows are (needs a memory snapshot per question)

    def __post_init__(self):
        self.distances = tuple(sorted(set(int(d) for d in self.distances)))
        if not self.distances or self.distances[0] < 0:
            raise ValueError(f"distances {self.distances} must be non-negative injection counts")
        self.modes = check_modes(self.modes)
        metrics.postprocess("", self.postprocess)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be positive (or 0: the model's T)")
        for name, template, slot in (("context_template", self.context_template, "context"),
                                     ("question_template", self.question_template, "question")):
            if "{" + slot + "}" not in template:
                raise ValueError(f"{name} {template!r} must contain {{{slot}}}")

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- distractors
class Distractors(Protocol):
    name: str

    def texts(self, index: int, record: QARecord) -> Iterable[str]:
        """The distractor texts for example `index`, in injection order."""


@dataclass
class OwnThenOthers:
    """The record's own distractors, then the contexts of the following records (wrapping round,
    never its own): the default for any qa.py file."""
    records: Sequence[QARecord]
    name: str = "own+others"

    def texts(self, index: int, record: QARecord) -> Iterator[str]:
        yield from record.distractors
        n = len(self.records)
        for k in range(1, n):
            other = self.records[(index + k) % n]
            if other.context != record.context:
                yield other.context


@dataclass
class FixedDistractors:
    """The same texts for every example, in order (the authors' protocol: unrelated contexts
    taken once from the training split)."""
    items: Sequence[str]
    name: str = "fixed"

    def texts(self, index: int, record: QARecord) -> Sequence[str]:
        return self.items


# ---------------------------------------------------------------------- one example
def score(answer, references: list[str], how: str) -> dict:
    final = metrics.postprocess(answer.text, how)
    return {**answer.to_json(), "answer": final, **metrics.qa_scores(final, references)}


def run_example(source: ModelSource, tokenizer, index: int, record: QARecord, distractors: Distractors,
                s: Settings, modes: tuple[str, ...]) -> dict:
    model = source.fresh(index)
    question = tokenizer.encode(s.question_template.format(question=record.question))
    ask_kw = dict(max_new_tokens=s.max_new_tokens, eos_ids=tokenizer.eos_ids)
    out = {"key": f"{index}:{record.id}", "index": index, "id": record.id, "answers": record.answers}
    if "borderline" in modes:
        out["borderline"] = score(ask(model, question, tokenizer, mode="borderline", **ask_kw), record.answers, s.postprocess)
    targets = inject_text(model, tokenizer.encode(s.context_template.format(context=record.context)), s.chunk_tokens)
    out["context_injections"] = targets
    texts, queued = iter(distractors.texts(index, record)), deque()
    injected = tokens = 0
    out["by_distance"] = {}
    for distance in s.distances:
        while injected < distance:
            if not queued:
                text = next(texts, None)
                if text is None:
                    break
                queued.extend(split_ids(model, tokenizer.encode(text), s.chunk_tokens))
                continue
            chunk = queued.popleft()
            inject_chunk(model, chunk)
            injected, tokens = injected + 1, tokens + chunk.numel()
        if injected < distance:
            out["ran_out_of_distractors_at"] = injected
            break
        entry = {"tokens": tokens}
        if s.locate and source.is_mplus:
            entry["location"] = locate(model, targets)
            entry["chance"] = [round(c, 4) for c in chance_recall(entry["location"], model, model.config.ltm_retrieved)]
        for mode in (m for m in modes if m != "borderline"):
            entry[mode] = score(ask(model, question, tokenizer, mode=mode, targets=targets, **ask_kw),
                                record.answers, s.postprocess)
        out["by_distance"][str(distance)] = entry
    return out


# ---------------------------------------------------------------------- the run
def run(source: ModelSource, tokenizer, records: Sequence[QARecord], settings: Settings | None = None, *,
        distractors: Distractors | None = None, data: dict | None = None, out=None, limit: int | None = None,
        restart: bool = False, progress: bool = True) -> dict:
    """Evaluate `records` (the first `limit` of them); returns {"summary", "examples", ...} and,
    with `out`, writes the run folder (resumable, see `results`). `data` describes the data
    source for the run's settings (a resumed run must use the same)."""
    s = settings or Settings()
    if not records:
        raise ValueError("no records to evaluate")
    distractors = distractors or OwnThenOthers(records)
    run_settings = {**s.to_json(), "distractors": distractors.name, "data": data or {"records": len(records)}}
    store, modes = prepare(source, tokenizer, TASK, run_settings, s.modes, out, restart)
    todo = [(i, f"{i}:{r.id}", (source, tokenizer, i, r, distractors, s, modes)) for i, r in enumerate(records)][:limit]
    last, started = str(s.distances[-1]), time.perf_counter()

    def running(rec: dict) -> dict[str, float]:
        """F1 at the largest distance (the borderline has no distance)."""
        out = {}
        for mode in modes:
            entry = rec.get("borderline") if mode == "borderline" else rec.get("by_distance", {}).get(last, {}).get(mode)
            if entry:
                out[f"{MODE_LABELS[mode]} F1"] = entry["f1"]
        return out

    examples = run_examples(todo, run_example, store, f"retention, D up to {last}", running, progress)
    return finish(store, summarize(examples, s, modes), examples, started)


# ---------------------------------------------------------------------- summary
def _scores(entries: list[dict]) -> dict:
    return {"n": len(entries), **{k: mean(e[k] for e in entries) for k in ("em", "f1", "hit")}}


def recall_summary(entries: list[dict]) -> dict:
    """recall@R by layer among the questions with retrievable rows of the fact at that layer
    (or all questions when locations were not taken), and where the fact's rows were."""
    with_recall = [e for e in entries if e.get("mplus", {}).get("recall") is not None]
    if not with_recall:
        return {}
    layers = len(with_recall[0]["mplus"]["recall"])
    located = all("location" in e for e in with_recall)
    by_layer, retrievable, chance = [], [], []
    for l in range(layers):
        pool = [e for e in with_recall if not located or sum(e["location"][l][1:]) > 0]
        retrievable.append(len(pool))
        by_layer.append(mean(float(e["mplus"]["recall"][l]) for e in pool))
        chance.append(mean(e["chance"][l] for e in pool if "chance" in e))
    any_pool = [e for e in with_recall if not located or any(sum(loc[1:]) > 0 for loc in e["location"])]
    out = {"by_layer": by_layer, "chance_by_layer": chance, "questions_retrievable_by_layer": retrievable,
           "any_layer": mean(float(any(e["mplus"]["recall"])) for e in any_pool),
           "mean_share": mean(sum(e["mplus"]["share"]) / layers for e in with_recall),
           "conditional_on_location": located}
    if located:
        n = len(with_recall)
        out["fact_rows_mean"] = {k: mean(sum(loc[i] for loc in e["location"]) / layers for e in with_recall)
                                 for i, k in enumerate(("stm", "pending", "ltm"))}
        out["forgotten"] = mean(float(all(sum(loc) == 0 for loc in e["location"])) for e in with_recall) if n else None
    return out


def summarize(examples: list[dict], s: Settings, modes: tuple[str, ...]) -> dict:
    ok = [e for e in examples if "error" not in e]
    rows = []
    for d in s.distances:
        entries = [e["by_distance"][str(d)] for e in ok if str(d) in e.get("by_distance", {})]
        row = {"distance": d, "n": len(entries), "tokens_mean": mean(e["tokens"] for e in entries)}
        for mode in modes:
            if mode != "borderline":
                row[mode] = _scores([e[mode] for e in entries])
        row["recall"] = recall_summary(entries)
        rows.append(row)
    out = {"examples": len(ok), "failed": failed_keys(examples), "by_distance": rows}
    if "borderline" in modes:
        out["borderline"] = _scores([e["borderline"] for e in ok])
    short = [e["key"] for e in ok if "ran_out_of_distractors_at" in e]
    if short:
        out["ran_out_of_distractors"] = short
    return out

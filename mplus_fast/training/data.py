"""Training data as episodes: the injections of one step and the questions asked after them.

An episode is `injections` contexts written one after another; `facts` of them are contexts a
question needs (written with gradient), the others are distractors (written without). After the
last injection every fact's question is asked, at distance D = the number of injections that
followed it. Questions about facts of earlier steps (`Ledger`) are asked too, at longer
distances, without gradient to their writing (their step's graph is gone).

Two sources give the same episodes:
- `SyntheticFacts`: facts planted in the books' prose (`facts.py`), with the passage's
  continuation for the language-model objective;
- `RecordSource`: a user's JSONL (`mplus_fast.qa`): each record's context is a fact, the
  distractors of all records are the pool of distractor injections.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from mplus_fast.qa import QARecord, read_jsonl
from mplus_fast.training.facts import ADJECTIVES, NAMES, OBJECTS, PLACES, FactSource, draw_facts

LEXICON = NAMES + OBJECTS + ADJECTIVES + PLACES
from mplus_fast.training.objectives import ReadRow
from mplus_fast.training.vocab import Codec


@dataclass
class Ask:
    prompt: list[int]
    answer: list[int]            # answer tokens + eos


@dataclass
class Episode:
    injections: list[list[int]]
    needed: list[tuple[int, Ask]]   # (injection index, a question about a fact it holds); an index may repeat
    continuation: list[int] | None = None   # the text following the last injection

    @property
    def fact_injections(self) -> set[int]:
        return {i for i, _ in self.needed}


def _check_tokens(ids: list[int], what: str, limit: int) -> list[int]:
    if not ids:
        raise ValueError(f"{what} encodes to zero tokens")
    if len(ids) > limit:
        raise ValueError(f"{what} has {len(ids)} tokens, more than the {limit} allowed")
    return ids


def fact_slots(rng: random.Random, injections: int, facts: int) -> list[int]:
    """Which of the episode's injections hold facts: distinct, uniform positions."""
    return sorted(rng.sample(range(injections), facts))


class SyntheticFacts:
    """Episodes of synthetic facts among book passages; each context fits one injection."""

    def __init__(self, source: FactSource, codec: Codec):
        self.source, self.codec = source, codec
        # random contexts draw from the tokens of the fact lexicon: what answers are made of
        self.lexicon = sorted({i for w in LEXICON for i in codec.encode(" " + w)})

    def episode(self, rng: random.Random, injections: int, facts: int, continuation_tokens: int,
                random_distractors: bool = False, random_tokens: int = 0, facts_per_injection: int = 1) -> Episode:
        """`facts` of the `injections` hold `facts_per_injection` facts each (distinct questions
        within the episode), each asked about. `random_distractors`: distractors are random
        sequences of the fact lexicon's tokens (or, with `random_tokens` = n, of the ids
        3 … n + 2: a vocabulary curriculum), which nothing but the memory can predict (a
        curriculum for reading back: `Stage.distractors = "random"`)."""
        pool = self.lexicon if not random_tokens else range(3, min(3 + random_tokens, self.codec.vocab_size))
        slots = fact_slots(rng, injections, facts)
        drawn = draw_facts(rng, self.source.split, facts * facts_per_injection)
        chosen = {i: drawn[k * facts_per_injection:(k + 1) * facts_per_injection] for k, i in enumerate(slots)}
        inj, needed, follow = [], [], None
        for i in range(injections):
            if i in chosen:
                inj.append(self.codec.encode(self.source.facts_context(rng, chosen[i])))
                needed += [(i, Ask(self.codec.encode(f.question), self.codec.encode(" " + f.answer) + [self.codec.eos]))
                           for f in chosen[i]]
                follow = None
            elif random_distractors:
                inj.append([rng.choice(pool) for _ in range(self.source.budget)])
                follow = None
            else:
                text, follow = self.source.distractor(rng)
                inj.append(self.codec.encode(text))
        cont = None
        if continuation_tokens and follow:
            cont = self.codec.encode(" " + follow)[:continuation_tokens] or None
        return Episode(inj, needed, cont)


class RecordSource:
    """Episodes from question-answer records (a user's JSONL file)."""

    def __init__(self, records: list[QARecord], codec: Codec, max_context_tokens: int, where: str = "records"):
        if not records:
            raise ValueError(f"{where}: no records")
        self.codec = codec
        self.items: list[tuple[list[int], Ask]] = []
        self.pool: list[list[int]] = []
        for r in records:
            ctx = _check_tokens(codec.encode(r.context), f"{where}: record {r.id!r} context", max_context_tokens)
            ask = Ask(_check_tokens(codec.encode(r.question), f"{where}: record {r.id!r} question", max_context_tokens),
                      codec.encode(" " + r.answer) + [codec.eos])
            self.items.append((ctx, ask))
            self.pool += [_check_tokens(codec.encode(d), f"{where}: record {r.id!r} distractor", max_context_tokens)
                          for d in r.distractors]
        if not self.pool:  # no distractors given: other records' contexts play that part
            self.pool = [ctx for ctx, _ in self.items]

    @classmethod
    def from_jsonl(cls, path: str | Path, codec: Codec, max_context_tokens: int) -> "RecordSource":
        return cls(list(read_jsonl(path)), codec, max_context_tokens, str(path))

    def episode(self, rng: random.Random, injections: int, facts: int, continuation_tokens: int,
                random_distractors: bool = False, random_tokens: int = 0, facts_per_injection: int = 1) -> Episode:
        if random_distractors:
            raise ValueError("distractors = \"random\" is for the synthetic data (data.kind = \"synthetic\")")
        if facts_per_injection != 1:
            raise ValueError("facts_per_injection is for the synthetic data (a record's context is one injection)")
        facts = min(facts, len(self.items))
        slots = fact_slots(rng, injections, facts)
        picked = dict(zip(slots, rng.sample(self.items, facts)))
        inj = [picked[i][0] if i in picked else rng.choice(self.pool) for i in range(injections)]
        return Episode(inj, [(i, picked[i][1]) for i in slots])


@dataclass
class Ledger:
    """Questions about facts written in earlier steps: (injection id, question), newest last."""
    capacity: int = 4096
    entries: deque = field(default_factory=deque)

    def add(self, injection_id: int, ask: Ask) -> None:
        self.entries.append((injection_id, ask))
        while len(self.entries) > self.capacity:
            self.entries.popleft()

    def sample(self, rng: random.Random, k: int, next_id: int, lo: int, hi: int) -> list[tuple[int, Ask]]:
        """Up to k questions whose fact is at distance lo…hi injections (distance of id i: next_id − 1 − i)."""
        ok = [e for e in self.entries if lo <= next_id - 1 - e[0] <= hi]
        return rng.sample(ok, min(k, len(ok)))

    def forget_before(self, first_id: int) -> None:
        while self.entries and self.entries[0][0] < first_id:
            self.entries.popleft()

    def to_json(self) -> list:
        return [[i, a.prompt, a.answer] for i, a in self.entries]

    @classmethod
    def from_json(cls, data: list, capacity: int) -> "Ledger":
        led = cls(capacity)
        for i, p, a in data:
            led.add(int(i), Ask(list(p), list(a)))
        return led


def ask_row(ask: Ask, source: int) -> ReadRow:
    return ReadRow("qa", ask.prompt, ask.answer, source)


def text_row(kind: str, tokens: list[int], prompt_tokens: int, source: int = -1) -> ReadRow:
    """A text to read on: its first `prompt_tokens` tokens choose the retrieved rows."""
    k = max(1, min(prompt_tokens, len(tokens) - 1))
    return ReadRow(kind, tokens[:k], tokens[k:], source)

"""Synthetic facts planted in real prose: the data the tiny M+ learns to remember.

A fact says where a character of the books keeps an object:

    context   "Mr. Knightley keeps the copper key in the old desk. It was a sweet, ..."
    question  "Where does Mr. Knightley keep the copper key?"
    answer    "in the old desk"

The context is the fact sentence followed by a passage of Jane Austen or Moby-Dick (from
`mplus_fast.corpus`), cut to fit one injection; distractors are plain passages of the same books.
The answer (an adjective and a place, 24 × 30 = 720 equally likely answers) can only be read
from the memory: guessing scores 0.14%.

Held-out facts are unseen in training twice over: their (character, object) pairs never occur in
training facts (one pair in five is reserved, chosen by a hash, whatever the seed), and their
passages come from the last tenth of every book, which training never reads.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from mplus_fast.qa import QARecord

NAMES = (
    "Emma", "Harriet", "Mr. Knightley", "Mr. Elton", "Jane Fairfax", "Frank Churchill", "Miss Bates", "Mr. Woodhouse",
    "Elizabeth", "Mr. Darcy", "Mr. Bingley", "Lydia", "Mr. Wickham", "Mr. Collins", "Charlotte", "Lady Catherine",
    "Anne", "Captain Wentworth", "Lady Russell", "Mary Musgrove", "Elinor", "Marianne", "Willoughby",
    "Colonel Brandon", "Edward", "Fanny", "Edmund", "Mary Crawford", "Henry Crawford", "Lady Bertram", "Catherine",
    "Henry Tilney", "Isabella", "General Tilney", "Ishmael", "Queequeg", "Captain Ahab", "Starbuck", "Stubb", "Flask",
)
OBJECTS = (
    "key", "letter", "ring", "locket", "book", "map", "compass", "knife", "watch", "coin", "ribbon", "glove",
    "shawl", "bonnet", "candle", "lamp", "pen", "purse", "seal", "harpoon", "pipe", "flute", "bell", "mirror",
    "brooch", "diary", "portrait", "fan", "cup", "spoon", "needle", "thimble", "whistle", "telescope", "scarf",
    "basket", "lantern", "button", "chain", "feather",
)
ADJECTIVES = (
    "old", "blue", "small", "green", "painted", "dusty", "oak", "locked", "narrow", "red", "broken", "silver",
    "wooden", "empty", "dark", "white", "tall", "low", "round", "black", "yellow", "secret", "little", "great",
)
PLACES = (
    "desk", "box", "drawer", "chest", "cupboard", "cellar", "attic", "closet", "trunk", "cabinet", "shelf", "barn",
    "stable", "garden", "chapel", "parlour", "library", "kitchen", "hall", "tower", "cottage", "boat", "cabin",
    "hold", "study", "pantry", "bureau", "wardrobe", "dairy", "church",
)
# (statement, question); the answer is always "in the {adj} {place}".
TEMPLATES = (
    ("{name} keeps the {obj} in the {adj} {place}.", "Where does {name} keep the {obj}?"),
    ("{name} hid the {obj} in the {adj} {place}.", "Where did {name} hide the {obj}?"),
    ("The {obj} of {name} lies in the {adj} {place}.", "Where does the {obj} of {name} lie?"),
)
HELD_OUT_EVERY = 5        # one (character, object) pair in five is never used for training
TRAIN_FRACTION = 0.9      # training passages come from the first 90% of every book


def lexicon_words() -> tuple[str, ...]:
    """Every word a fact, its question or its answer is made of (a word vocabulary keeps them whole)."""
    fixed = " ".join(re.sub(r"\{\w+\}", " ", s + " " + q) for s, q in TEMPLATES) + " in the"
    return tuple(" ".join((*NAMES, *OBJECTS, *ADJECTIVES, *PLACES, fixed)).split())


@dataclass(frozen=True)
class Fact:
    name: str
    obj: str
    adj: str
    place: str
    template: int = 0

    @property
    def statement(self) -> str:
        return TEMPLATES[self.template][0].format(name=self.name, obj=self.obj, adj=self.adj, place=self.place)

    @property
    def question(self) -> str:
        return TEMPLATES[self.template][1].format(name=self.name, obj=self.obj)

    @property
    def answer(self) -> str:
        return f"in the {self.adj} {self.place}"


def is_held_out(name: str, obj: str) -> bool:
    """Whether the (character, object) pair is reserved for evaluation (fixed, seed-independent)."""
    digest = hashlib.sha256(f"{name}|{obj}".encode()).digest()
    return digest[0] % HELD_OUT_EVERY == 0


@functools.lru_cache(maxsize=None)
def pairs(split: str) -> tuple[tuple[str, str], ...]:
    """The (character, object) pairs of one split, "train" or "held_out"."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r} must be 'train' or 'held_out'")
    want = split == "held_out"
    return tuple((n, o) for n in NAMES for o in OBJECTS if is_held_out(n, o) == want)


def draw_facts(rng: random.Random, split: str, k: int) -> list[Fact]:
    """k facts about k different (character, object) pairs of `split` (distinct questions)."""
    chosen = rng.sample(pairs(split), k)
    return [Fact(n, o, rng.choice(ADJECTIVES), rng.choice(PLACES), rng.randrange(len(TEMPLATES))) for n, o in chosen]


# ---------------------------------------------------------------------- prose
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’]?\s+(?=[\"'“‘]?[A-Z])")
_HEADING = re.compile(r"^\s*(CHAPTER|Chapter|VOLUME|Volume|BOOK|ETYMOLOGY|EXTRACTS)\b.*$|^[^a-z]*$", re.MULTILINE)


def sentences(text: str) -> list[str]:
    """A book's prose as sentences with single spaces (headings, blank lines and `_` emphasis dropped)."""
    text = _HEADING.sub(" ", text).replace("_", "")
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_END.split(text) if len(s.split()) >= 3]


class Prose:
    """Sentences of the books, the first `TRAIN_FRACTION` of each book for "train", the rest for
    "held_out"; passages cut to a token budget with the model's tokenizer."""

    def __init__(self, books: dict[str, str], count_tokens: Callable[[str], int], split: str):
        if split not in ("train", "held_out"):
            raise ValueError(f"split={split!r} must be 'train' or 'held_out'")
        self.count = count_tokens
        self.sentences: list[str] = []
        for name in sorted(books):
            ss = sentences(books[name])
            cut = int(len(ss) * TRAIN_FRACTION)
            self.sentences += ss[:cut] if split == "train" else ss[cut:]
        if len(self.sentences) < 100:
            raise ValueError(f"too little prose for split {split!r}: {len(self.sentences)} sentences")

    def words_from(self, rng: random.Random, n_words: int = 120) -> list[str]:
        """About `n_words` words of running prose from a random sentence start."""
        i = rng.randrange(len(self.sentences))
        words: list[str] = []
        while len(words) < n_words and i < len(self.sentences):
            words += self.sentences[i].split()
            i += 1
        return words

    def fit(self, lead: str, words: list[str], budget: int) -> tuple[str, list[str]]:
        """`lead` followed by as many of `words` as fit in `budget` tokens: (text, words left).
        A lead longer than the budget stays whole (one longer injection: all its tokens are read)."""
        lo, hi = 0, len(words)
        join = lambda k: " ".join(([lead] if lead else []) + words[:k])
        if not lead and self.count(words[0]) > budget:   # a single very long word: a piece of it
            lo, hi = 1, 1
        while lo < hi:  # the largest k whose text fits
            mid = (lo + hi + 1) // 2
            if self.count(join(mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return join(lo), words[lo:]

    def passage(self, rng: random.Random, budget: int, lead: str = "") -> tuple[str, str]:
        """(passage of at most `budget` tokens starting with `lead`, the words that follow it)."""
        text, rest = self.fit(lead, self.words_from(rng), budget)
        return text, " ".join(rest)


class FactSource:
    """Records (`mplus_fast.qa.QARecord`) of facts planted in prose, for training or evaluation."""

    def __init__(self, prose: Prose, split: str, budget: int):
        self.prose, self.split, self.budget = prose, split, budget

    def fact_context(self, rng: random.Random, fact: Fact) -> str:
        return self.prose.passage(rng, self.budget, lead=fact.statement)[0]

    def facts_context(self, rng: random.Random, facts: list[Fact]) -> str:
        """One injection holding several facts, each statement followed by prose, the budget
        shared equally (one fact: `fact_context`)."""
        if len(facts) == 1:
            return self.fact_context(rng, facts[0])
        parts, used = [], 0
        for k, f in enumerate(facts):
            share = (self.budget - used) // (len(facts) - k)     # what the earlier parts left, shared
            parts.append(self.prose.passage(rng, share, lead=f.statement)[0])
            used = self.prose.count(" ".join(parts))
        return " ".join(parts)

    def distractor(self, rng: random.Random) -> tuple[str, str]:
        """(a plain passage, its continuation in the book)."""
        return self.prose.passage(rng, self.budget)

    def record(self, rng: random.Random, fact: Fact, n_distractors: int = 0, rid: str = "") -> QARecord:
        return QARecord(self.fact_context(rng, fact), fact.question, [fact.answer],
                        [self.distractor(rng)[0] for _ in range(n_distractors)], rid)

    def records(self, seed: int, n: int, n_distractors: int = 0) -> list[QARecord]:
        """n records with distinct questions within each group of len(pairs) (deterministic from seed)."""
        rng = random.Random(seed)
        out: list[QARecord] = []
        pool = pairs(self.split)
        while len(out) < n:
            for fact in draw_facts(rng, self.split, min(len(pool), n - len(out))):
                out.append(self.record(rng, fact, n_distractors, f"{self.split}-{len(out):05d}"))
        return out


def write_held_out(path, tokenizer_path, n: int = 1000, distractors: int = 64, seed: int = 0, budget: int | None = None):
    """The held-out facts as a `mplus_fast.qa` JSONL file (each with its own `distractors`
    passages, from the held-out part of the books), for `mplus-fast eval retention --data`."""
    from pathlib import Path

    from mplus_fast.config import MPlusConfig
    from mplus_fast.corpus import load_books
    from mplus_fast.qa import write_jsonl
    from mplus_fast.training.vocab import Codec, load_tokenizer
    folder = Path(tokenizer_path)
    codec = Codec(load_tokenizer(folder))
    if budget is None:
        budget = MPlusConfig.from_file(folder / "config.json").num_tokens
    source = FactSource(Prose(load_books(), codec.count, "held_out"), "held_out", budget)
    return write_jsonl(path, source.records(seed, n, distractors))


if __name__ == "__main__":  # python -m mplus_fast.training.facts OUT.jsonl MODEL_DIR [N] [DISTRACTORS]
    import sys
    args = sys.argv[1:]
    if len(args) < 2:
        raise SystemExit("usage: python -m mplus_fast.training.facts OUT.jsonl MODEL_DIR [N=1000] [DISTRACTORS=64]")
    out = write_held_out(args[0], args[1], *(int(a) for a in args[2:4]))
    print(f"wrote {out}")

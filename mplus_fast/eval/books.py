"""Offline evaluation data built from public-domain prose (`mplus_fast.corpus`: Austen's six
novels and Moby-Dick, fetched from Debian's packages at set-up or test time, never committed).

- Facts planted by substitution: a passage of real prose from one book in which one sentence is
  replaced by an invented fact ("Ambrose Thistlewood keeps the brass compass in the linen
  chest."), with its question and answer. The names and values are made up and drawn at
  random, so no model knows the answer from its training data: only the memory can supply it.
- Distractors from the other books: a stream of consecutive prose from books other than the
  fact's, from a random place, as long as the distance asks (0 … 160k tokens and beyond).
- Haystacks for the long-document tasks: consecutive prose of a book, cut to a length in
  tokens, with one sentence (a needle, an event) inserted at a depth.
Everything is a pure function of (seed, example index): the same set on every machine.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

from mplus_fast.eval.metrics import NOT_AFTER_TITLE
from mplus_fast.qa import QARecord

FIRST_NAMES = ("Ambrose", "Beatrix", "Cornelius", "Dorothea", "Evander", "Felicity", "Gideon", "Honoria", "Isidore",
               "Jemima", "Leopold", "Marigold", "Octavius", "Perpetua", "Quentin", "Rosalind", "Silas", "Theodora",
               "Ulric", "Winifred")
SURNAMES = ("Thistlewood", "Ashcombe", "Pennyfeather", "Blackmore", "Hollingsworth", "Quarrington", "Fenwick",
            "Larkspur", "Wetherby", "Crowhurst", "Merriweather", "Staveley", "Oakenshaw", "Pemberton", "Ravensworth")
OBJECTS = ("brass compass", "silver thimble", "copper key", "ivory comb", "velvet purse", "pewter flask",
           "glass locket", "oak snuffbox", "tin whistle", "leather journal")
PLACES = ("linen chest", "garden shed", "blue teapot", "music room", "hollow oak", "attic trunk", "coach house",
          "writing desk", "cellar cupboard", "hat box")
ANIMALS = ("spaniel", "parrot", "pony", "tabby cat", "goose")
PET_NAMES = ("Pudding", "Admiral", "Biscuit", "Clementine", "Duchess", "Gooseberry", "Marmalade", "Nutmeg",
             "Pickwick", "Tuppence")
TOWNS = ("Bramblecombe", "Hartlepool Minor", "Kettleby", "Lower Wickham", "Marshfield", "Nettlebury", "Oxwich",
         "Puddlestone", "Rookhaven", "Thornbury")


@dataclass(frozen=True)
class FactKind:
    sentence: str            # the planted sentence
    question: str
    answer: str
    slot: str                # the slot whose value is the answer (multiple-choice options share it)


FACT_KINDS = (
    FactKind("{name} keeps the {object} in the {place}.", "Where does {name} keep the {object}?", "in the {place}", "place"),
    FactKind("The {object} that {name} bought cost {number} shillings.",
             "How many shillings did the {object} that {name} bought cost?", "{number}", "number"),
    FactKind("{name} has a {animal} called {pet}.", "What is the name of {name}'s {animal}?", "{pet}", "pet"),
    FactKind("{name} was born in the town of {town}.", "In which town was {name} born?", "{town}", "town"),
)
SLOT_VALUES = {"place": PLACES, "number": tuple(str(n) for n in range(12, 99)), "pet": PET_NAMES, "town": TOWNS}

# A sentence ends at . ! ? before a capital or a quote, but not after Mr. Mrs. Dr. St.
_SENTENCE = re.compile(r"(?<=[.!?])" + NOT_AFTER_TITLE + r"\s+(?=[A-Z\"'“‘])")


def draw_fact(rng: random.Random) -> tuple[FactKind, dict]:
    kind = FACT_KINDS[rng.randrange(len(FACT_KINDS))]
    values = {"name": f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}", "object": rng.choice(OBJECTS),
              "place": rng.choice(PLACES), "number": rng.choice(SLOT_VALUES["number"]), "animal": rng.choice(ANIMALS),
              "pet": rng.choice(PET_NAMES), "town": rng.choice(TOWNS)}
    return kind, values


# ---------------------------------------------------------------------- prose
@lru_cache(maxsize=1)
def _books() -> dict[str, str]:
    from mplus_fast.corpus import load_books
    return load_books()


def paragraphs(book: str) -> list[str]:
    """A book's paragraphs of prose (blank-line separated, whitespace collapsed, headings and
    short lines dropped)."""
    return _paragraphs(_books()[book])


@lru_cache(maxsize=16)
def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para.split()) >= 25 and not para.isupper():
            out.append(para)
    return out


def sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE.split(paragraph) if s]


def book_names() -> tuple[str, ...]:
    from mplus_fast.corpus import BOOKS
    return BOOKS


# ---------------------------------------------------------------------- planted facts
def planted_facts(n: int, seed: int = 0, passage_sentences: int = 4, books: Sequence[str] | None = None) -> list[QARecord]:
    """`n` facts, each planted by substitution in a passage of `passage_sentences` consecutive
    sentences of real prose (one of them replaced by the fact at a random place). The record id
    names the book: "<book>-<index>"."""
    books = tuple(books or book_names())
    out = []
    for i in range(n):
        rng = random.Random(f"fact:{seed}:{i}")
        book = books[i % len(books)]
        kind, values = draw_fact(rng)
        passage = _passage(book, rng, passage_sentences)
        passage[rng.randrange(len(passage))] = kind.sentence.format(**values)
        out.append(QARecord(" ".join(passage), kind.question.format(**values), [kind.answer.format(**values)], [],
                            f"{book}-{i:05d}"))
    return out


def _passage(book: str, rng: random.Random, count: int) -> list[str]:
    paras = paragraphs(book)
    for _ in range(1000):
        sents = sentences(paras[rng.randrange(len(paras))])
        if len(sents) >= count:
            start = rng.randrange(len(sents) - count + 1)
            return sents[start:start + count]
    raise RuntimeError(f"{book}: no paragraph of {count} sentences found")


def book_of(record: QARecord) -> str | None:
    name = record.id.rsplit("-", 1)[0]
    return name if name in book_names() else None


# ---------------------------------------------------------------------- distractors
@dataclass
class BookDistractors:
    """Consecutive prose of the books other than the fact's, from a random place (by seed and
    example), in pieces of about `piece_chars` characters, without end."""
    seed: int = 0
    piece_chars: int = 4000
    name: str = "books"

    def texts(self, index: int, record: QARecord) -> Iterator[str]:
        own = book_of(record)
        others = [b for b in book_names() if b != own]
        rng = random.Random(f"distract:{self.seed}:{index}")
        rng.shuffle(others)
        piece = ""
        first = True
        while True:
            for book in others:
                paras = paragraphs(book)
                start = rng.randrange(len(paras)) if first else 0
                first = False
                for para in paras[start:]:
                    piece = f"{piece} {para}" if piece else para
                    if len(piece) >= self.piece_chars:
                        yield piece
                        piece = ""


# ---------------------------------------------------------------------- haystacks
def haystack_ids(tokenizer, book: str, length: int, rng: random.Random) -> list[list[int]]:
    """Consecutive prose of `book` from a random paragraph, as token ids per sentence, about
    `length` tokens in all (whole sentences; the last one may be cut)."""
    paras = paragraphs(book)
    start = rng.randrange(len(paras))
    out, total = [], 0
    k = start
    while total < length:
        for s in sentences(paras[k % len(paras)]):
            ids = tokenizer.encode(" " + s if out else s)
            out.append(ids[: length - total])
            total += len(out[-1])
            if total >= length:
                break
        k += 1
    return out


def insert_at_depth(sentence_ids: list[list[int]], needle: list[int], depth: float) -> tuple[list[int], int]:
    """Token ids of the haystack with the needle placed between sentences at `depth` (0: first,
    1: last) of the text; returns (ids, token offset of the needle)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} must be within [0, 1]")
    total = sum(len(s) for s in sentence_ids)
    target, pos, cut = depth * total, 0, len(sentence_ids)
    for k, s in enumerate(sentence_ids):
        if pos + len(s) / 2 > target:
            cut = k
            break
        pos += len(s)
    before = [t for s in sentence_ids[:cut] for t in s]
    after = [t for s in sentence_ids[cut:] for t in s]
    return before + needle + after, len(before)

"""Where a retention run's examples come from: `--data` names one of
- a qa.py JSONL file (any source of question-answer records: a user's, or the held-out facts
  of the trained tiny model); distractors: each record's own, then the other records' contexts;
- a folder in the authors' SQuAD / NaturalQA layout (`authors`); their fixed unrelated contexts
  and their generation settings (10 new tokens, no cut, scored by exact hit beside EM/F1);
- `books` or `books:N`: N facts planted in Austen / Moby-Dick prose (default 200), distractors
  from the other books (`books`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mplus_fast.eval import authors, books
from mplus_fast.qa import QARecord, read_jsonl

BOOKS_DEFAULT_FACTS = 200
AUTHORS_PRESET = {"max_new_tokens": 10, "postprocess": "none", "chunk_tokens": 512}


@dataclass
class RetentionData:
    records: list[QARecord]
    distractors: object | None         # a retention.Distractors; None: the records' own, then the others'
    description: dict
    preset: dict = field(default_factory=dict)   # settings this data's protocol uses by default


def load_retention_data(spec: str, tokenizer, *, max_distance: int, seed: int = 0) -> RetentionData:
    from mplus_fast.eval.retention import FixedDistractors
    if spec == "books" or spec.startswith("books:"):
        n = _count(spec)
        return RetentionData(books.planted_facts(n, seed), books.BookDistractors(seed),
                             {"source": "books", "facts": n, "seed": seed})
    path = Path(spec)
    if path.is_dir():
        sset = authors.load(path)
        unrelated = sset.unrelated_contexts(tokenizer, max_distance)
        return RetentionData(sset.records, FixedDistractors(unrelated, name=f"{sset.name}-train"),
                             {"source": f"authors-{sset.name}", "path": str(path.resolve())}, dict(AUTHORS_PRESET))
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path} (give a qa.py JSONL file, a folder with the authors' "
                                "SQuAD/NQ files, or 'books')")
    records = list(read_jsonl(path))
    if not records:
        raise ValueError(f"{path} holds no records")
    return RetentionData(records, None, {"source": "jsonl", "path": str(path.resolve()), "bytes": path.stat().st_size})


def _count(spec: str) -> int:
    if spec == "books":
        return BOOKS_DEFAULT_FACTS
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--data {spec!r}: expected books:N with N a positive number of facts")
    return n

"""Question-answer records: the JSONL format shared by training (`mplus_fast.training`) and
evaluation (`mplus_fast.eval`), so a user's own data fine-tunes and evaluates with the same file.

One JSON object per line:

    {"id": "fact-00017",                      # optional; default: "line-<n>"
     "context": "Mr. Knightley keeps a copper key in the old desk.",   # what is injected first
     "question": "Where does Mr. Knightley keep the copper key?",      # asked after the distractors
     "answer": "in the old desk",             # a string, or a list of accepted answers
     "distractors": ["…", "…"]}               # optional: contexts injected in between, in order

Blank lines are skipped. A malformed line is reported with its number and the field at fault.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mplus_fast.atomic import write_bytes_atomic


class QAFormatError(ValueError):
    """A malformed record (the message gives the file, the line number and the field)."""


@dataclass
class QARecord:
    context: str
    question: str
    answers: list[str]
    distractors: list[str] = field(default_factory=list)
    id: str = ""

    @property
    def answer(self) -> str:
        """The reference answer (the first accepted one)."""
        return self.answers[0]

    def to_json(self) -> dict:
        out = asdict(self)
        answers = out.pop("answers")
        out["answer"] = answers if len(answers) > 1 else answers[0]
        if not self.distractors:
            out.pop("distractors")
        if not self.id:
            out.pop("id")
        return out


def _strings(value, name: str, where: str, allow_empty_list: bool) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and (value or allow_empty_list):
        return list(value)
    raise QAFormatError(f"{where}: field {name!r} must be a string or a list of strings, got {json.dumps(value)[:80]}")


def parse_record(obj, where: str, default_id: str) -> QARecord:
    if not isinstance(obj, dict):
        raise QAFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("context", "question", "answer"):
        if name not in obj:
            raise QAFormatError(f"{where}: missing field {name!r}")
    for name in ("context", "question"):
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise QAFormatError(f"{where}: field {name!r} must be a non-empty string")
    answers = _strings(obj["answer"], "answer", where, allow_empty_list=False)
    if not all(a.strip() for a in answers):
        raise QAFormatError(f"{where}: field 'answer' holds an empty answer")
    distractors = _strings(obj.get("distractors", []), "distractors", where, allow_empty_list=True)
    unknown = set(obj) - {"id", "context", "question", "answer", "distractors"}
    if unknown:
        raise QAFormatError(f"{where}: unknown field(s) {sorted(unknown)} (expected id, context, question, answer, distractors)")
    rid = obj.get("id", default_id)
    if not isinstance(rid, (str, int)):
        raise QAFormatError(f"{where}: field 'id' must be a string")
    return QARecord(obj["context"], obj["question"], answers, distractors, str(rid))


def json_lines(path: str | Path) -> Iterator[tuple[str, object]]:
    """("<path>:<line number>", decoded JSON value) for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise QAFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def read_jsonl(path: str | Path) -> Iterator[QARecord]:
    """The records of a JSONL file, in order (see the module doc for the format)."""
    for where, obj in json_lines(path):
        yield parse_record(obj, where, f"line-{where.rsplit(':', 1)[1]}")


def write_jsonl(path: str | Path, records: Iterable[QARecord]) -> Path:
    """Write records atomically (one JSON object per line)."""
    path = Path(path)
    text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path

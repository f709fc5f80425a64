"""The authors' knowledge-retention sets (MemoryLLM / M+ papers), read from a user's local copy.

Their README has the files downloaded into this layout (the Hugging Face dataset
`YuWangX/KnowledgeRetention`):

    squad/  dev-v2.0.json  train-v2.0.json  indices_squad_3.npy
    nq/     v1.0-simplified_nq-dev-all.jsonl  v1.0-simplified_simplified-nq-train.jsonl  indices_nq_4.npy

What their evaluation does with them, and so what we do:
- examples: SQuAD v2 dev questions that have an answer, flattened in file order (article →
  paragraph → question); NQ dev records with a short answer, the context being the long answer
  (its non-HTML tokens joined by spaces) and the answer the first short answer. The `indices_*.npy`
  file picks and orders the examples (the first `limit` of it); without it, file order.
- prompts: context "Context: " + context; question "Questions: " + question + " Answer:" (SQuAD)
  or + "? Answer:" (NQ); 10 new tokens; scored by "exact hit" (the answer is a substring of the
  generation), which we report beside EM and F1.
- distractors ("unrelated contexts"): the SAME list for every example, built once from the train
  split: paragraphs (SQuAD) or long answers (NQ) joined by spaces until a piece reaches 768
  (SQuAD) / more than 512 (NQ) tokens, then the next piece starts; as many pieces as the largest
  distance; each cut to its first 512 tokens; one piece = one injection.
Where their code is accidental we do the evident intent and say so: NQ train records that carry
`document_text` instead of `document_tokens` are sliced by whitespace tokens (their code slices
characters by token indices); long answers of length zero are skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mplus_fast.qa import QAFormatError, QARecord, json_lines

SQUAD_FILES = ("dev-v2.0.json", "train-v2.0.json", "indices_squad_3.npy")
NQ_FILES = ("v1.0-simplified_nq-dev-all.jsonl", "v1.0-simplified_simplified-nq-train.jsonl", "indices_nq_4.npy")
PIECE_TOKENS = 512            # each unrelated context is cut to this many tokens


@dataclass
class AuthorsSet:
    name: str                 # "squad" or "nq"
    records: list[QARecord]   # context/question already in the authors' prompt format
    folder: Path

    def unrelated_contexts(self, tokenizer, count: int) -> list[str]:
        """The `count` distractor texts of the authors' protocol, made with `tokenizer`."""
        if count <= 0:
            return []
        if self.name == "squad":
            texts, grow_while = _squad_train_paragraphs(self.folder / SQUAD_FILES[1]), (lambda n: n < 768)
        else:
            texts, grow_while = _nq_train_long_answers(self.folder / NQ_FILES[1]), (lambda n: n <= 512)
        pieces: list[str] = []
        for text in texts:
            if pieces and grow_while(len(tokenizer.encode(pieces[-1]))):
                pieces[-1] += " " + text
            elif pieces and len(pieces) == count:
                break
            else:
                pieces.append(text)
        if len(pieces) < count:
            raise ValueError(f"{self.folder}: the train split gives only {len(pieces)} unrelated contexts, {count} needed")
        return [tokenizer.decode(tokenizer.encode(p)[:PIECE_TOKENS]) for p in pieces]


def detect(folder: Path) -> str | None:
    """"squad" / "nq" when the folder holds that set's dev file."""
    if (folder / SQUAD_FILES[0]).is_file():
        return "squad"
    if (folder / NQ_FILES[0]).is_file():
        return "nq"
    return None


def load(folder: str | Path, name: str | None = None) -> AuthorsSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    name = name or detect(folder)
    if name == "squad":
        records = _squad_dev(folder / SQUAD_FILES[0])
        indices = folder / SQUAD_FILES[2]
    elif name == "nq":
        records = _nq_dev(folder / NQ_FILES[0])
        indices = folder / NQ_FILES[2]
    else:
        raise FileNotFoundError(f"{folder} holds neither the authors' SQuAD set ({SQUAD_FILES[0]}) nor their NQ set "
                                f"({NQ_FILES[0]})")
    if indices.is_file():
        from numpy.lib.format import read_array
        with indices.open("rb") as f:
            order = [int(i) for i in read_array(f, allow_pickle=False)]   # an .npy of integers, never a pickle
        bad = [i for i in order if not 0 <= i < len(records)]
        if bad:
            raise QAFormatError(f"{indices}: index {bad[0]} is outside the {len(records)} examples of the dev file")
        records = [records[i] for i in order]
    return AuthorsSet(name, records, folder)


# ---------------------------------------------------------------------- SQuAD
def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QAFormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def _squad_articles(path: Path) -> list:
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise QAFormatError(f"{path}: expected a SQuAD file ({{\"data\": [articles]}})")
    return data["data"]


def _squad_dev(path: Path) -> list[QARecord]:
    out = []
    for a, article in enumerate(_squad_articles(path)):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(para.get("context"), str):
                raise QAFormatError(f"{where}: missing 'context'")
            for q, qa in enumerate(para.get("qas", [])):
                answers = [x.get("text", "") for x in qa.get("answers", [])]
                if qa.get("is_impossible") or not answers or not answers[0]:
                    continue
                if not isinstance(qa.get("question"), str):
                    raise QAFormatError(f"{where}.qas[{q}]: missing 'question'")
                out.append(QARecord("Context: " + para["context"], "Questions: " + qa["question"] + " Answer:",
                                    [answers[0]], [], str(qa.get("id", f"squad-{len(out)}"))))
    return out


def _squad_train_paragraphs(path: Path) -> Iterator[str]:
    for article in _squad_articles(path):
        for para in article.get("paragraphs", []):
            yield para["context"]


# ---------------------------------------------------------------------- Natural Questions
def _span(tokens: list, start: int, end: int) -> str:
    return " ".join(t["token"] for t in tokens[start:end] if not t.get("html_token"))


def _nq_dev(path: Path) -> list[QARecord]:
    out = []
    for where, obj in json_lines(path):
        try:
            ann = obj["annotations"][0]
            if ann.get("yes_no_answer") == "None":   # the authors' filter, kept as written
                continue
            shorts = ann["short_answers"]
            if not shorts:
                continue
            tokens = obj["document_tokens"]
            long_answer = _span(tokens, ann["long_answer"]["start_token"], ann["long_answer"]["end_token"])
            short = _span(tokens, shorts[0]["start_token"], shorts[0]["end_token"])
            question = obj["question_text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise QAFormatError(f"{where}: not a Natural Questions record (missing {exc})") from None
        out.append(QARecord("Context: " + long_answer, "Questions: " + question + "? Answer:", [short], [],
                            str(obj.get("example_id", f"nq-{len(out)}"))))
    return out


def _nq_train_long_answers(path: Path) -> Iterator[str]:
    for where, obj in json_lines(path):
        try:
            ann = obj["annotations"][0]
            if ann.get("yes_no_answer") == "None":
                continue
            start, end = ann["long_answer"]["start_token"], ann["long_answer"]["end_token"]
            if "document_tokens" in obj:
                text = _span(obj["document_tokens"], start, end)
            else:
                text = " ".join(obj["document_text"].split()[start:end])
        except (KeyError, IndexError, TypeError) as exc:
            raise QAFormatError(f"{where}: not a Natural Questions record (missing {exc})") from None
        if text:
            yield text

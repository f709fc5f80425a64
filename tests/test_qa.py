"""The shared question-answer JSONL format (mplus_fast.qa)."""
from __future__ import annotations

import pytest

from mplus_fast.qa import QAFormatError, QARecord, read_jsonl, write_jsonl


def test_round_trip(tmp_path):
    recs = [QARecord("ctx one", "q one?", ["a"], ["d1", "d2"], "x1"), QARecord("ctx two", "q two?", ["b", "B"])]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    back = list(read_jsonl(path))
    assert back[0] == recs[0]
    assert back[1].answers == ["b", "B"] and back[1].id == "line-2" and back[1].distractors == []


@pytest.mark.parametrize("line,match", [
    ('{"context": "c", "question": "q"}', r"d.jsonl:2: missing field 'answer'"),
    ('{"context": "", "question": "q", "answer": "a"}', r":2: field 'context' must be a non-empty string"),
    ('{"context": "c", "question": "q", "answer": 3}', r":2: field 'answer' must be a string"),
    ('{"context": "c", "question": "q", "answer": "a", "distractors": "x", "extra": 1}', r":2: unknown field\(s\) \['extra'\]"),
    ('{"context": "c", "question": "q", "answer": "a", "distractors": [1]}', r":2: field 'distractors'"),
    ('{"context": "c", "question": ', r":2: not valid JSON"),
    ('[1, 2]', r":2: expected a JSON object"),
])
def test_malformed_line_is_named(tmp_path, line, match):
    path = tmp_path / "d.jsonl"
    path.write_text('{"context": "c", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(QAFormatError, match=match):
        list(read_jsonl(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        list(read_jsonl(tmp_path / "nope.jsonl"))

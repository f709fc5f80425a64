"""`mplus-fast eval`: every task end to end on a tiny model with --limit, and the user errors."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mplus_fast.cli import app
from mplus_fast.qa import QARecord, write_jsonl

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def facts_file(path, n=3):
    recs = [QARecord("emma keeps the red key in the desk .", "where does emma keep the red key ?", ["in the desk"],
                     ["the cat is in the house of the town ."] * 2, f"f{i}") for i in range(n)]
    return write_jsonl(path, recs)


def test_retention_end_to_end(fact_ckpt, tmp_path):
    data, out = facts_file(tmp_path / "facts.jsonl"), tmp_path / "run"
    r = invoke("retention", fact_ckpt, "--data", data, "--distances", "0,1,3", "--limit", 2, "--out", out,
               "--max-new-tokens", 3, "--quiet")
    assert r.exit_code == 0, r.output
    assert "accuracy (%) by distance" in r.output and "recall@R" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["examples"] == 2 and res["settings"]["distances"] == [0, 1, 3]
    assert (out / "retention_accuracy.png").stat().st_size > 1000 and (out / "retention_recall.png").is_file()
    again = invoke("retention", fact_ckpt, "--data", data, "--distances", "0,1,3", "--limit", 2, "--out", out,
                   "--max-new-tokens", 3, "--quiet", "--no-plots")
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text())["summary"] == res["summary"]


def test_malformed_jsonl_line_is_named(fact_ckpt, tmp_path):
    data = facts_file(tmp_path / "facts.jsonl")
    with data.open("a") as f:
        f.write("\n{\"context\": \"c\", \"question\": \"q\"}\n")
    r = invoke("retention", fact_ckpt, "--data", data, "--quiet")
    assert r.exit_code == 2 and f"{data}:5: missing field 'answer'" in " ".join(r.output.split())


@pytest.mark.parametrize("args, msg", [
    (["retention", "CKPT", "--data", "nowhere.jsonl"], "data not found: nowhere.jsonl"),
    (["retention", "CKPT", "--data", "books:x"], "books:N"),
    (["retention", "CKPT", "--data", "FACTS", "--distances", "0,a"], "--distances"),
    (["retention", "CKPT", "--data", "FACTS", "--modes", "mplus,rag"], "'rag'"),
    (["retention", "missing-ckpt", "--data", "FACTS"], "checkpoint folder not found"),
    (["retention", "CKPT", "--data", "FACTS", "--tokenizer", "no/such/tokenizer.json"], "no tokenizer found"),
])
def test_user_errors_are_one_line(fact_ckpt, tmp_path, args, msg):
    facts = facts_file(tmp_path / "facts.jsonl")
    args = [str(fact_ckpt) if a == "CKPT" else str(facts) if a == "FACTS" else a for a in args]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert msg in " ".join(r.output.split()) and "Traceback" not in r.output


def test_unknown_task_is_refused():
    r = invoke("ruler", "ckpt")
    assert r.exit_code == 2 and "No such command 'ruler'" in r.output


def test_facts_are_written_in_the_qa_format(tmp_path):
    from mplus_fast.qa import read_jsonl
    r = runner.invoke(app, ["eval", "facts", str(tmp_path / "f.jsonl"), "--n", "3", "--distractor-tokens", "300"])
    assert r.exit_code == 0, r.output
    recs = list(read_jsonl(tmp_path / "f.jsonl"))
    assert len(recs) == 3 and all(r.distractors and sum(len(d.split()) for d in r.distractors) >= 300 for r in recs)

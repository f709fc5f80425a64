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


def test_longbench_end_to_end(prose_ckpt, tmp_path):
    rec = {"input": "Who wrote it?", "context": "Emma wrote the letter.", "answers": ["Emma"], "length": 5,
           "all_classes": None, "_id": "a"}
    (tmp_path / "hotpotqa.jsonl").write_text((json.dumps(rec) + "\n") * 2)
    r = invoke("longbench", prose_ckpt, "--data", tmp_path, "--limit", 1, "--max-new-tokens", 3, "--out", tmp_path / "o",
               "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["summary"]["by_dataset"]["hotpotqa"]["n"] == 1 and (tmp_path / "o" / "longbench_scores.png").is_file()
    bad = invoke("longbench", prose_ckpt, "--data", tmp_path, "--datasets", "ruler")
    assert bad.exit_code == 2 and "unknown LongBench dataset(s) ['ruler']" in bad.output


@pytest.mark.parametrize("task, args, plot", [
    ("niah", ["--lengths", "32,64", "--depths", "0,1", "--samples", 1, "--limit", 3], "niah_mplus.png"),
    ("events", ["--length", 48, "--limit", 2], "events_acc.png"),
    ("perplexity", ["--memory-tokens", 32, "--eval-tokens", 8, "--limit", 2], "perplexity_ppl.png"),
])
def test_book_tasks_end_to_end(prose_ckpt, tmp_path, task, args, plot):
    r = invoke(task, prose_ckpt, *args, "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["task"] == task and res["summary"]["failed"] == [] and (tmp_path / plot).stat().st_size > 1000


def test_retention_on_planted_book_facts(prose_ckpt, tmp_path):
    r = invoke("retention", prose_ckpt, "--data", "books:2", "--distances", "0,3", "--max-new-tokens", 3, "--quiet",
               "--out", tmp_path)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["distractors"] == "books" and res["summary"]["by_distance"][1]["tokens_mean"] == 24

"""LongBench, NIAH, planted events and perplexity: each task's reads against the same reads done
by hand with the public API, and its scoring rules."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mplus_fast.chunking import chunk_ids
from mplus_fast.eval import events, longbench, metrics, niah, perplexity, session
from mplus_fast.eval.tokenizer import load_tokenizer
from mplus_fast.qa import QAFormatError


@pytest.fixture(scope="module")
def prose(prose_ckpt):
    return session.ModelSource.from_pretrained(prose_ckpt, seed=2), load_tokenizer(None, prose_ckpt)


def lb_record(i, **kw):
    return {"input": f"Who wrote letter {i}?", "context": "Passage 1: Emma wrote a letter to Harriet. " * 3,
            "answers": ["Emma"], "length": 40, "all_classes": None, "_id": f"x{i}", **kw}


@pytest.fixture
def lb_dir(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text("".join(json.dumps(lb_record(i)) + "\n" for i in range(3)))
    trec = lb_record(9, input="What city is the capital?", answers=["Location"],
                     all_classes=["Abbreviation", "Entity", "Location", "Human"])
    (tmp_path / "trec.jsonl").write_text(json.dumps(trec) + "\n")
    return tmp_path


def test_longbench_reads_like_the_protocol(prose, lb_dir):
    source, tok = prose
    examples = longbench.load_examples(lb_dir)
    assert [d for d, _ in examples] == ["hotpotqa"] * 3 + ["trec"]
    s = longbench.Settings(max_new_tokens=6)
    got = longbench.run_example(source, tok, 0, *examples[0], s, session.MODES)
    template = longbench.datasets()["hotpotqa"]["prompt"]
    head, tail = template.split("{context}")
    ex = examples[0][1]
    inject = tok.encode(head + ex["context"])
    read = torch.tensor(tok.encode(tail.replace("{input}", ex["input"])))[None]
    model = source.fresh(0)
    gen = lambda retrieve: tok.decode(model.generate(read, max_new_tokens=6, retrieve=retrieve)[0, read.shape[1]:].tolist())
    assert got["predictions"]["borderline"] == gen(True)
    for c in chunk_ids(torch.tensor(inject), 8):
        model.inject_memory(c, update_memory=True)
    assert got["injections"] == len(chunk_ids(torch.tensor(inject), 8))
    assert got["predictions"]["mplus"] == gen(True) and got["predictions"]["stm"] == gen(False)
    for mode, text in got["predictions"].items():
        assert got["scores"][mode]["none"] == pytest.approx(metrics.best(metrics.qa_f1, text, ["Emma"]), abs=1e-4)


def test_longbench_official_postprocessing_and_classification(prose, lb_dir):
    source, tok = prose
    res = longbench.run(source, tok, longbench.load_examples(lb_dir), longbench.Settings(max_new_tokens=4), progress=False)
    trec = res["examples"][-1]
    for mode, text in trec["predictions"].items():
        first = metrics.first_line(text)
        want = metrics.classification_score(first, "Location", ["Abbreviation", "Entity", "Location", "Human"])
        assert trec["scores"][mode]["official"] == pytest.approx(want)
    s = res["summary"]
    assert s["by_dataset"]["hotpotqa"]["n"] == 3 and s["by_dataset"]["trec"]["metric"] == "classification"
    mean_f1 = sum(e["scores"]["mplus"]["official"] for e in res["examples"][:3]) / 3
    assert s["by_dataset"]["hotpotqa"]["mplus"]["official"] == pytest.approx(100 * mean_f1, abs=0.01)


def test_longbench_tail_split_and_truncation(prose):
    source, tok = prose
    ex = lb_record(0)
    inj, read = longbench.split_prompt("hotpotqa", ex, tok, longbench.Settings(split="tail", read_tokens=20), 32)
    full_inj, full_read = longbench.split_prompt("hotpotqa", ex, tok, longbench.Settings(), 32)
    assert len(read) == 20 and inj + read == full_inj + full_read
    budget = len(full_read) + 30
    cut_inj, cut_read = longbench.split_prompt("hotpotqa", ex, tok, longbench.Settings(max_length=budget), 32)
    assert len(cut_inj) + len(cut_read) == budget and cut_read == full_read
    assert cut_inj[:10] == full_inj[:10] and cut_inj[-10:] == full_inj[-10:], "LongBench cuts the middle"


def test_longbench_bad_input_is_named(tmp_path):
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(lb_record(0)) + "\n" + json.dumps({"input": "q"}) + "\n")
    with pytest.raises(QAFormatError, match=r"hotpotqa.jsonl:2: missing field 'context'"):
        longbench.load_examples(tmp_path)
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(lb_record(0, dataset="ruler")) + "\n")
    with pytest.raises(QAFormatError, match="unknown LongBench dataset 'ruler'"):
        longbench.load_examples(tmp_path)
    with pytest.raises(FileNotFoundError, match="no musique.jsonl"):
        longbench.load_examples(tmp_path, ["musique"])


def test_span_injections_are_the_chunks_holding_it():
    assert session.span_injections(10, 3, [8, 8, 8], 5) == [6]
    assert session.span_injections(7, 3, [8, 8, 8], 0) == [0, 1]
    assert session.span_injections(0, 1, [8], 2) == [2]


def test_niah_grid_and_the_needle_position(prose):
    source, tok = prose
    s = niah.Settings(lengths=(48, 96), depths=(0.0, 1.0), samples=1, max_new_tokens=4)
    res = niah.run(source, tok, s, progress=False)
    assert [(e["length"], e["depth"]) for e in res["examples"]] == [(48, 0.0), (48, 1.0), (96, 0.0), (96, 1.0)]
    first, last = res["examples"][2], res["examples"][3]
    n_chunks = len(chunk_ids(torch.zeros(last["tokens"]), 8))
    assert first["needle_injections"][0] == 0 and last["needle_injections"][-1] == n_chunks - 1
    grid = res["summary"]["grid"]["mplus"]
    assert set(grid) == {"0.0", "1.0"} and set(grid["0.0"]) == {"48", "96"}
    assert grid["1.0"]["96"] == last["mplus"]["hit"]


def test_events_choose_the_most_likely_option(prose):
    source, tok = prose
    res = events.run(source, tok, 2, events.Settings(length=64), progress=False)
    for e in res["examples"]:
        assert len(e["options"]) == 4 and len(set(e["options"])) == 4
        for mode in session.MODES:
            lp = e[mode]["logprobs"]
            assert e[mode]["acc"] == float(lp.index(max(lp)) == e["truth"])
    assert res["summary"]["chance"] == 0.25


def test_perplexity_borderline_is_the_plain_read(prose):
    source, tok = prose
    s = perplexity.Settings(memory_tokens=40, eval_tokens=16)
    res = perplexity.run(source, tok, 2, s, progress=False)
    e = res["examples"][0]
    from mplus_fast.eval import books
    import random
    sents = books.haystack_ids(tok, e["book"], 56, random.Random("ppl:0:0"))
    ids = [t for x in sents for t in x]
    lp, _, _ = session.token_logprobs(source.fresh(0), [], ids[40:56])
    assert e["borderline"]["nll"] == pytest.approx(-sum(lp))
    total = sum(x[m]["nll"] for x in res["examples"] for m in ["mplus"])
    assert res["summary"]["mplus"]["ppl"] == pytest.approx(math.exp(total / res["summary"]["scored_tokens"]), rel=1e-4)

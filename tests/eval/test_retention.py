"""Knowledge retention: the protocol against the same steps done by hand with the public API,
recall@R against the provenance of the reads, resumable runs, failing examples, bad input."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mplus_fast.chunking import chunk_ids
from mplus_fast.eval import retention, session
from mplus_fast.eval.results import RunFolderError
from mplus_fast.eval.tokenizer import load_tokenizer
from mplus_fast.qa import QARecord

CONTEXTS = ["emma keeps the red key in the desk .", "harriet keeps the blue box in the garden house .",
            "mr knightley was born in the town of highbury .", "miss emma has a dog called paris ."]
QUESTIONS = [("where does emma keep the red key ?", "in the desk"), ("where does harriet keep the blue box ?", "in the garden house"),
             ("in which town was mr knightley born ?", "highbury"), ("what is the name of the dog ?", "paris")]
FILLER = "the cat is in the house of the town and the dog was in the garden of the city of bath ."


def records(n=4):
    return [QARecord(CONTEXTS[i], QUESTIONS[i][0], [QUESTIONS[i][1]], [FILLER] * 3, f"r{i}") for i in range(n)]


@pytest.fixture
def setup(fact_ckpt):
    source = session.ModelSource.from_pretrained(fact_ckpt, seed=1)
    return source, load_tokenizer(None, fact_ckpt)


SETTINGS = dict(distances=(0, 2, 5), max_new_tokens=4)


def test_example_matches_the_protocol_done_by_hand(setup):
    source, tok = setup
    recs = records()
    got = retention.run_example(source, tok, 1, recs[1], retention.OwnThenOthers(recs), retention.Settings(**SETTINGS),
                                session.MODES)
    model = source.fresh(1)
    q = torch.tensor(tok.encode(recs[1].question))[None]
    gen = lambda retrieve: tok.decode(model.generate(q, max_new_tokens=4, retrieve=retrieve)[0, q.shape[1]:].tolist())
    assert got["borderline"]["text"] == gen(True)
    chunks = lambda text: chunk_ids(torch.tensor(tok.encode(text)), 8)   # T tokens, no tiny tail
    fact = chunks(recs[1].context)
    for c in fact:
        model.inject_memory(c, update_memory=True)
    assert got["context_injections"] == list(range(len(fact)))
    stream = [c for text in recs[1].distractors + [recs[2].context, recs[3].context, recs[0].context] for c in chunks(text)]
    done = 0
    for d in (0, 2, 5):
        for c in stream[done:d]:
            model.inject_memory(c, update_memory=True)
        done = d
        entry = got["by_distance"][str(d)]
        assert entry["tokens"] == sum(c.numel() for c in stream[:d])
        assert entry["mplus"]["text"] == gen(True) and entry["stm"]["text"] == gen(False)
        prov = model(q).ltm_provenance
        targets = torch.tensor(got["context_injections"])
        assert entry["mplus"]["recall"] == [bool(torch.isin(p[0], targets).any()) for p in prov]
        st = model.state
        assert entry["location"] == [[int(torch.isin(t, targets).sum()) for t in (st.stm_prov[l], st.pend_prov[l], st.ltm_prov[l])]
                                     for l in range(model.config.num_hidden_layers)]
    # by D = 5 the fact has left the STM in part: some of its rows are retrievable
    assert sum(sum(loc[1:]) for loc in got["by_distance"]["5"]["location"]) > 0


def test_an_example_does_not_depend_on_the_ones_before(setup):
    source, tok = setup
    recs = records()
    full = retention.run(source, tok, recs, retention.Settings(**SETTINGS), progress=False)
    alone = retention.run_example(source, tok, 3, recs[3], retention.OwnThenOthers(recs), retention.Settings(**SETTINGS),
                                  session.MODES)
    assert full["examples"][3] == alone


def test_summary_counts_every_question_once(setup):
    source, tok = setup
    res = retention.run(source, tok, records(), retention.Settings(**SETTINGS), progress=False)
    s = res["summary"]
    assert s["examples"] == 4 and s["failed"] == []
    assert [r["distance"] for r in s["by_distance"]] == [0, 2, 5] and all(r["n"] == 4 for r in s["by_distance"])
    f1 = [e["by_distance"]["5"]["mplus"]["f1"] for e in res["examples"]]
    assert s["by_distance"][2]["mplus"]["f1"] == pytest.approx(sum(f1) / 4, abs=1e-4)
    rec = s["by_distance"][2]["recall"]
    pool = [e for e in res["examples"] if sum(e["by_distance"]["5"]["location"][0][1:]) > 0]
    assert rec["questions_retrievable_by_layer"][0] == len(pool)
    if pool:
        want = sum(e["by_distance"]["5"]["mplus"]["recall"][0] for e in pool) / len(pool)
        assert rec["by_layer"][0] == pytest.approx(want, abs=1e-4)
    # D = 0: the fact is wholly in the STM, nothing to retrieve yet
    assert s["by_distance"][0]["recall"]["questions_retrievable_by_layer"] == [0, 0]


def test_a_killed_run_resumes_without_counting_twice(setup, tmp_path, monkeypatch):
    source, tok = setup
    recs = records()
    whole = retention.run(source, tok, recs, retention.Settings(**SETTINGS), progress=False)
    calls, real = [], retention.run_example

    def dies_at_third(*args):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt   # the user's ^C, or a kill between two examples
        return real(*args)

    monkeypatch.setattr(retention, "run_example", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        retention.run(source, tok, recs, retention.Settings(**SETTINGS), out=tmp_path, progress=False)
    lines = (tmp_path / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 2
    with (tmp_path / "examples.jsonl").open("a") as f:     # a write cut short by the kill
        f.write('{"key": "2:r2", "index": 2, "by_dis')
    calls.clear()
    monkeypatch.setattr(retention, "run_example", lambda *a: (calls.append(a[2]), real(*a))[1])
    resumed = retention.run(source, tok, recs, retention.Settings(**SETTINGS), out=tmp_path, progress=False)
    assert calls == [2, 3], "only the unfinished examples run again"
    assert resumed["summary"] == whole["summary"]
    keys = [json.loads(l)["key"] for l in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert keys == ["0:r0", "1:r1", "2:r2", "3:r3"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == whole["summary"] and saved["model"]["config_hash"] == source.config_hash()
    assert {"package_version", "git_commit", "device", "timings", "settings"} <= set(saved)


def test_a_run_folder_of_other_settings_is_refused(setup, tmp_path):
    source, tok = setup
    retention.run(source, tok, records(2), retention.Settings(**SETTINGS), out=tmp_path, progress=False)
    with pytest.raises(RunFolderError, match="settings.max_new_tokens"):
        retention.run(source, tok, records(2), retention.Settings(distances=(0, 2, 5), max_new_tokens=5), out=tmp_path,
                      progress=False)
    again = retention.run(source, tok, records(2), retention.Settings(distances=(0, 2, 5), max_new_tokens=5), out=tmp_path,
                          restart=True, progress=False)
    assert again["summary"]["examples"] == 2


def test_a_failing_example_is_reported_and_skipped(setup, capsys):
    source, tok = setup
    recs = records()
    recs[2] = QARecord("BROKEN " + recs[2].context, recs[2].question, recs[2].answers, [], "bad")

    def encode(text):
        if "BROKEN" in text:
            raise RuntimeError("the tokenizer cannot encode this")
        return tok.encode(text)

    flaky = dataclasses.replace(tok, _encode=encode)
    res = retention.run(source, flaky, recs, retention.Settings(distances=(0, 1), max_new_tokens=2), progress=False)
    assert res["summary"]["failed"] == ["2:bad"] and res["summary"]["examples"] == 3
    assert "example 2 failed and is skipped: RuntimeError: the tokenizer cannot encode this" in capsys.readouterr().err
    assert all(r["n"] == 3 for r in res["summary"]["by_distance"])


def test_stm_mode_is_dropped_for_memoryllm(tmp_path):
    from mplus_fast.testing import make_random_checkpoint
    ckpt = make_random_checkpoint(tmp_path, architectures=["MemoryLLM"], num_tokens=8, num_blocks=4)
    assert session.available_modes(session.ModelSource.from_pretrained(ckpt), session.MODES) == ("mplus", "borderline")


@pytest.mark.parametrize("kw, msg", [(dict(distances=(-1,)), "non-negative"), (dict(modes=("mplus", "rag")), "'rag'"),
                                      (dict(postprocess="first-word"), "first-word"),
                                      (dict(question_template="Q:"), "{question}")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        retention.Settings(**kw)


def test_chance_recall_is_the_hypergeometric_floor():
    from math import comb
    loc = [[3, 2, 5], [0, 0, 0], [1, 0, 4], [0, 1, 1]]
    got = session.chance_recall(loc, [100, 50, 10, 30], retrieved=12)
    assert got[0] == pytest.approx(1 - comb(93, 12) / comb(100, 12))
    assert got[1] == 0.0 and got[2] == 1.0, "nothing to find; every row is read when M <= R"
    assert got[3] == pytest.approx(1 - comb(28, 12) / comb(30, 12))


def test_fresh_memory_equals_a_newly_built_model(setup):
    """Restoring the load-time snapshot is the same as building the model again."""
    from mplus_fast.model import MPlus
    source, tok = setup
    recs = records()
    retention.run(source, tok, recs[:2], retention.Settings(**SETTINGS), progress=False)   # the model has been used
    reused = retention.run_example(source, tok, 3, recs[3], retention.OwnThenOthers(recs), retention.Settings(**SETTINGS),
                                   session.MODES)
    rebuilt = session.ModelSource.from_pretrained(source.path, seed=source.seed)
    rebuilt._model = MPlus(rebuilt.config, rebuilt.tensors, seed=source.example_seed(3),
                           generation_config=source.generation_config)
    rebuilt._initial = (rebuilt._model.snapshot(), rebuilt._model.rope.state())
    assert reused == retention.run_example(rebuilt, tok, 3, recs[3], retention.OwnThenOthers(recs),
                                           retention.Settings(**SETTINGS), session.MODES)

"""The shipped tiny M+ (mplus_fast/models/tiny-mplus): its files, its size, both backends, and
its accuracy at D = 32 on 200 held-out facts against its committed evaluation table."""
from __future__ import annotations

import json
import random

import pytest
import torch

import mplus_fast
from mplus_fast.demo_recall import TINY_MODEL, tiny_model_ready

pytest.importorskip("tokenizers")
pytestmark = pytest.mark.skipif(not tiny_model_ready(), reason=f"the trained tiny model is not shipped ({TINY_MODEL}): "
                                "train it with `mplus-fast train mplus_fast/training/configs/tiny-mplus.toml`")
MARGIN = 0.10   # 200 facts: the binomial standard error at ~90% is 2.1 points; 10 points is ~5 sigma


def table():
    return json.loads((TINY_MODEL / "retention.json").read_text())


def test_the_shipped_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train-config.toml", "train-log.jsonl",
                 "retention.json", "retention.md"):
        assert (TINY_MODEL / name).is_file(), name
    assert (TINY_MODEL / "model.safetensors").stat().st_size <= 10 * 2**20
    cfg = json.loads((TINY_MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["MPlus"] and cfg["vocab_size"] <= 4096


def test_both_backends_agree_on_the_shipped_model():
    from mplus_fast.training.vocab import Codec, load_tokenizer
    codec = Codec(load_tokenizer(TINY_MODEL))
    ref = mplus_fast.load(TINY_MODEL, backend="reference", seed=0)
    fast = mplus_fast.load(TINY_MODEL, backend="fast", seed=0)
    ids = torch.tensor(codec.encode("Where does Emma keep the ring?"))[None]
    for m in (ref, fast):
        for text in ("Emma keeps the ring in the old desk. It was a fine day.", "Call me Ishmael. Some years ago"):
            m.inject_memory(torch.tensor(codec.encode(text)), update_memory=True)
    a, b = ref(ids), fast(ids)
    assert (a.logits - b.logits).abs().max() <= 1e-4 * a.logits.abs().max()
    assert torch.equal(ref.generate(ids, max_new_tokens=6), fast.generate(ids, max_new_tokens=6))


@pytest.mark.slow
def test_accuracy_at_distance_32_on_held_out_facts():
    """200 held-out facts, 32 distractor injections each, greedy answers with retrieval (fast
    backend), every fact from the checkpoint's memory: above the table's figure minus MARGIN."""
    from mplus_fast.checkpoint import load_checkpoint
    from mplus_fast.corpus import load_books
    from mplus_fast.model import MPlus
    from mplus_fast.training.facts import FactSource, Prose
    from mplus_fast.training.monitor import normalise
    from mplus_fast.training.vocab import Codec, load_tokenizer
    codec = Codec(load_tokenizer(TINY_MODEL))
    config, tensors = load_checkpoint(TINY_MODEL)
    source = FactSource(Prose(load_books(), codec.count, "held_out"), "held_out", config.num_tokens)
    records = source.records(seed=123, n=200, n_distractors=32)
    hits = 0
    for i, r in enumerate(records):
        model = MPlus(config, tensors, backend="fast", seed=i)
        for text in [r.context] + r.distractors:
            model.inject_memory(torch.tensor(codec.encode(text)), update_memory=True)
        q = torch.tensor(codec.encode(r.question))[None]
        out = model.generate(q, max_new_tokens=8)
        hits += normalise(codec.decode(out[0, q.shape[1]:])) == normalise(r.answer)
    expected = table()["mplus"]["32"]
    assert hits / len(records) >= expected - MARGIN, f"M+ at D=32: {hits / len(records):.1%}, table {expected:.1%}"


def test_the_demo_runs_the_shipped_model_by_default(tmp_path, monkeypatch):
    """`mplus-fast demo` without --random: held-out facts, STM-only vs M+ answers with
    provenance, the retention table and its plot."""
    from typer.testing import CliRunner

    from mplus_fast.cli import app
    monkeypatch.setenv("COLUMNS", "200")
    plot = tmp_path / "retention.png"
    r = CliRunner().invoke(app, ["demo", "--facts", "2", "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    assert "RANDOM" not in r.output and "STM only" in r.output and "M+" in r.output
    assert "the fact" in r.output                     # provenance of M+'s retrieved rows
    assert "Retention by distance" in r.output
    pytest.importorskip("matplotlib")
    assert plot.is_file() and plot.stat().st_size > 0

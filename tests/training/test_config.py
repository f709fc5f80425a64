"""Bad training configs and data files: one clear error naming the field or the line."""
from __future__ import annotations

import json

import pytest

from mplus_fast.qa import QAFormatError
from mplus_fast.training.config import TrainConfigError, load_config, parse_config

BASE = {"model": {"init": "scratch", "config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "intermediate_size": 96}},
        "stage": [{"name": "a", "steps": 10}]}


def with_(path: tuple, value):
    raw = json.loads(json.dumps(BASE))
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


def test_the_base_config_parses():
    cfg = parse_config(BASE)
    assert cfg.stages[0].name == "a" and cfg.stages[0].accumulate >= 1


@pytest.mark.parametrize("path, value, message", [
    (("stage", 0, "lr"), -1.0, "stage[1].lr=-1.0 must be positive"),
    (("stage", 0, "steps"), 0, "stage[1].steps=0 must be at least 1"),
    (("stage", 0, "facts"), 9, "stage[1].facts=9 must be between 0 and injections=4"),
    (("stage", 0, "retrieve"), 1.5, "stage[1].retrieve=1.5 must be a share between 0 and 1"),
    (("stage", 0, "lr"), "fast", "stage[1].lr must be a float, got 'fast'"),
    (("stage", 0, "learning_rate"), 0.1, "stage[1]: unknown field(s) ['learning_rate']"),
    (("stage", 0, "distractors"), "noise", "stage[1].distractors='noise' must be"),
    (("stage", 0, "recall_questions"), 4, "stage[1].max_distance=0 must be at least injections=4"),
    (("stage",), [], "no [[stage]] given"),
    (("model", "dtype"), "int8", "model.dtype='int8' must be float32, bfloat16 or float16"),
    (("model", "trainable"), ["everything"], "model.trainable=['everything'] must be a non-empty list of"),
    (("model", "config", "vocab_size"), 100, "model.config.vocab_size is taken from the tokenizer"),
    (("data",), {"kind": "csv"}, "data.kind='csv' must be"),
    (("tokenizer",), {"kind": "chars"}, "tokenizer.kind='chars' must be \"word\" or \"bpe\""),
    (("stage", 0, "random_tokens"), -1, "stage[1].random_tokens=-1 must not be negative"),
    (("data",), {"kind": "jsonl"}, "data.path is needed"),
    (("stage", 0, "in_context"), "yes", "stage[1].in_context must be a bool, got 'yes'"),
    (("seed",), "zero", "seed must be an int, got 'zero'"),
    (("stage", 0, "trainable"), ["decoder"], "stage[1].trainable=['decoder'] must be a non-empty list of"),
    (("stage", 0, "trainable"), [], "stage[1].trainable=[] must be a non-empty list of"),
    (("stage", 0, "trainable"), ["retriever"], "stage[1].retriever_weight=0.0 must be positive when only the retriever"),
    (("epochs",), 3, "unknown field(s) ['epochs']"),
    (("stage", 0, "until_accuracy"), 1.5, "stage[1].until_accuracy=1.5 must be an exact-match rate between 0 and 1"),
    (("stage", 0, "step_limit"), 40, "stage[1].step_limit=40 is only for a stage with until_accuracy"),
])
def test_bad_fields_are_named(path, value, message):
    with pytest.raises(TrainConfigError) as err:
        parse_config(with_(path, value))
    assert message in str(err.value)


def test_duplicate_stage_names_and_missing_geometry():
    raw = with_(("stage",), [{"name": "a", "steps": 1}, {"name": "a", "steps": 2}])
    with pytest.raises(TrainConfigError, match="stage names must be distinct"):
        parse_config(raw)
    raw = with_(("model", "config"), {"hidden_size": 8})
    with pytest.raises(TrainConfigError, match="model.config.num_hidden_layers is missing"):
        parse_config(raw)


def test_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = \n")
    with pytest.raises(TrainConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="training config not found"):
        load_config(tmp_path / "missing.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text('[[stage]]\nname = "s"\nsteps = 5\nlr = "high"\n')
    with pytest.raises(TrainConfigError, match=r"typo.toml: stage\[1\].lr must be a float, got 'high'"):
        load_config(typo)


def test_bad_data_files_name_the_line(tmp_path):
    from mplus_fast.training.data import RecordSource

    class Codec:
        eos = 2

        def encode(self, text):
            return [5 + len(w) for w in text.split()]
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"context": "a b c", "question": "q?", "answer": "x"}) + "\n"
                    + json.dumps({"context": "a b", "question": "q?"}) + "\n")
    with pytest.raises(QAFormatError, match=r"train.jsonl:2: missing field 'answer'"):
        RecordSource.from_jsonl(data, Codec(), max_context_tokens=8)
    data.write_text(json.dumps({"context": " ".join(["w"] * 20), "question": "q?", "answer": "x", "id": "long"}) + "\n")
    with pytest.raises(ValueError, match=r"record 'long' context has 20 tokens, more than the 8 allowed"):
        RecordSource.from_jsonl(data, Codec(), max_context_tokens=8)


def test_until_accuracy_needs_a_limit_past_steps_and_questions_to_score():
    def stage(**fields):
        return parse_config(with_(("stage",), [{"name": "a", "steps": 10, **fields}])).stages[0]
    assert stage(until_accuracy=0.9, step_limit=10).step_limit == 10
    with pytest.raises(TrainConfigError, match=r"stage\[1\].step_limit=0 must be at least steps=10"):
        stage(until_accuracy=0.9)
    with pytest.raises(TrainConfigError, match=r"stage\[1\].step_limit=5 must be at least steps=10"):
        stage(until_accuracy=0.9, step_limit=5)
    with pytest.raises(TrainConfigError, match=r"stage\[1\].until_accuracy=0.9 needs questions to score"):
        stage(until_accuracy=0.9, step_limit=20, facts=0)
    with pytest.raises(TrainConfigError, match=r"stage\[1\].until_accuracy=0.9 needs questions to score"):
        stage(until_accuracy=0.9, step_limit=20, qa_weight=0.0, repeat_weight=1.0)

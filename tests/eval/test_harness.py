"""The lm-evaluation-harness adapter on tiny local tasks (multiple choice, generation, rolling
log-likelihood), its numbers against the same reads done with our own API."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from mplus_fast.eval import harness, session  # noqa: E402
from mplus_fast.eval.tokenizer import load_tokenizer  # noqa: E402

DOCS = [{"document": "emma keeps the red key in the desk .", "question": "where does emma keep the red key ?",
         "choices": ["in the desk", "in the box", "in the garden"], "label": 0},
        {"document": "harriet was born in the town of bath .", "question": "in which town was harriet born ?",
         "choices": ["london", "bath", "rome"], "label": 1}]

TASKS = """
task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{document}}}}\\n\\n{{{{question}}}} answer :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc}}]
---
task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{document}}}}\\n\\n{{{{question}}}} answer :"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs: {{until: ["?"], max_gen_toks: 4}}
metric_list: [{{metric: exact_match}}]
---
task: tiny_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{document}}}} {{{{question}}}}"
doc_to_target: "{{{{document}}}} {{{{question}}}}"
metric_list: [{{metric: word_perplexity}}]
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    for i, text in enumerate(TASKS.format(data=data).split("---")):
        (d / f"task{i}.yaml").write_text(text)
    return d


def evaluate(fact_ckpt, task_dir, tasks, **model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": fact_ckpt, **model_args}.items())
    return simple_evaluate(model="mplus_fast", model_args=args, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)),
                           log_samples=True, bootstrap_iters=0)


@pytest.mark.parametrize("inject", [False, True])
def test_multiple_choice_equals_our_own_reads(fact_ckpt, task_dir, inject):
    res = evaluate(fact_ckpt, task_dir, ["tiny_mc"], inject_document=inject)
    source, tok = session.ModelSource.from_pretrained(fact_ckpt), load_tokenizer(None, fact_ckpt)
    want = []
    for doc in DOCS:
        model = source.fresh(0)
        if inject:
            session.inject_text(model, tok.encode(doc["document"]))
            prompt = tok.encode("\n\n" + doc["question"] + " answer :")
        else:
            prompt = tok.encode(doc["document"] + "\n\n" + doc["question"] + " answer :")
        scores = [sum(session.token_logprobs(model, prompt, tok.encode(" " + c))[0]) for c in doc["choices"]]
        want.append(float(scores.index(max(scores)) == doc["label"]))
    samples = res["samples"]["tiny_mc"]
    got = [s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert got == want
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(want) / len(want))


def test_generation_and_rolling_loglikelihood(fact_ckpt, task_dir):
    res = evaluate(fact_ckpt, task_dir, ["tiny_gen", "tiny_ppl"], inject_document=True)
    source, tok = session.ModelSource.from_pretrained(fact_ckpt), load_tokenizer(None, fact_ckpt)
    gens = sorted(res["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    for doc, sample in zip(DOCS, gens):
        model = source.fresh(0)
        session.inject_text(model, tok.encode(doc["document"]))
        text = session.ask(model, tok.encode("\n\n" + doc["question"] + " answer :"), tok, mode="mplus",
                           max_new_tokens=4, eos_ids=tok.eos_ids).text
        assert sample["resps"][0][0] == text.split("?")[0]
    ppl = res["results"]["tiny_ppl"]["word_perplexity,none"]
    assert ppl > 1.0 and ppl == ppl   # finite, more than one nat per word of random weights


def test_lm_eval_command_line_runs_the_model(fact_ckpt, task_dir, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "mplus_fast.cli", "eval", "harness", "--model", "mplus_fast",
                          "--model_args", f"pretrained={fact_ckpt}", "--tasks", "tiny_mc",
                          "--include_path", str(task_dir), "--output_path", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = list(out.rglob("results_*.json"))
    assert results and "tiny_mc" in json.loads(results[0].read_text())["results"]


def test_registered_beside_the_harness_own_models():
    from lm_eval.api.registry import get_model
    harness.register()
    assert get_model("mplus_fast") is harness.MPlusLM
    assert get_model("dummy").__name__ == "DummyLM"

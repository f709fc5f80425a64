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


def our_mc_choice(source, tok, doc, inject):
    model = source.fresh(0)
    if inject:
        session.inject_text(model, tok.encode(doc["document"]))
        prompt = tok.encode("\n\n" + doc["question"] + " answer :")
    else:
        prompt = tok.encode(doc["document"] + "\n\n" + doc["question"] + " answer :")
    return [sum(session.token_logprobs(model, prompt, tok.encode(" " + c))[0]) for c in doc["choices"]]


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("inject", [False, True])
def test_adapter_reads_as_we_do(fact_ckpt, inject):
    lm = harness.MPlusLM(str(fact_ckpt), inject_document=inject, max_gen_toks=4)
    source, tok = session.ModelSource.from_pretrained(fact_ckpt), load_tokenizer(None, fact_ckpt)
    for doc in DOCS:
        ctx = doc["document"] + "\n\n" + doc["question"] + " answer :"
        got = [lp for lp, _ in lm.loglikelihood([Request(ctx, " " + c) for c in doc["choices"]])]
        assert got == pytest.approx(our_mc_choice(source, tok, doc, inject))
        (text,) = lm.generate_until([Request(ctx, {"until": ["?"], "max_gen_toks": 3})])
        model = source.fresh(0)
        if inject:
            session.inject_text(model, tok.encode(doc["document"]))
        read = tok.encode("\n\n" + doc["question"] + " answer :" if inject else ctx)
        want = session.ask(model, read, tok, mode="mplus", max_new_tokens=3, eos_ids=tok.eos_ids).text
        assert text == want.split("?")[0]
    text = " ".join(d["document"] for d in DOCS)
    (rolled,) = lm.loglikelihood_rolling([Request(text)])
    ids = tok.encode(text)
    assert rolled == pytest.approx(sum(session.token_logprobs(source.fresh(0), [], ids)[0]))   # one window here


def test_rolling_windows_read_the_memory_of_the_earlier_ones(fact_ckpt):
    lm = harness.MPlusLM(str(fact_ckpt), inject_document=True, max_length=6)
    source, tok = session.ModelSource.from_pretrained(fact_ckpt), load_tokenizer(None, fact_ckpt)
    ids = tok.encode(" ".join(d["document"] for d in DOCS))
    model, want, start = source.fresh(0), 0.0, 1
    while start < len(ids):
        end = min(start + 5, len(ids))
        want += sum(session.token_logprobs(model, ids[start - 1:start], ids[start:end])[0])
        session.inject_text(model, ids[start - 1:end])
        start = end
    assert lm.loglikelihood_rolling([Request(" ".join(d["document"] for d in DOCS))])[0] == pytest.approx(want)


def test_simple_evaluate_on_tiny_local_tasks(fact_ckpt, task_dir):
    res = evaluate(fact_ckpt, task_dir, ["tiny_mc", "tiny_gen", "tiny_ppl"], inject_document=True, threads=1)
    source, tok = session.ModelSource.from_pretrained(fact_ckpt), load_tokenizer(None, fact_ckpt)
    want = []
    for doc in DOCS:
        scores = our_mc_choice(source, tok, doc, True)
        want.append(float(scores.index(max(scores)) == doc["label"]))
    got = [s["acc"] for s in sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])]
    assert got == want and res["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(want) / len(want))
    gens = sorted(res["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    for doc, sample in zip(DOCS, gens):
        model = source.fresh(0)
        session.inject_text(model, tok.encode(doc["document"]))
        text = session.ask(model, tok.encode("\n\n" + doc["question"] + " answer :"), tok, mode="mplus",
                           max_new_tokens=4, eos_ids=tok.eos_ids).text
        assert sample["resps"][0][0] == text.split("?")[0]
    ppl = res["results"]["tiny_ppl"]["word_perplexity,none"]
    assert 1.0 < ppl < float("inf")


COMMAND_LINES = {"lm_eval": [sys.executable, "-m", "lm_eval"],           # the harness's own, via the plugin
                 "mplus-fast eval harness": [sys.executable, "-m", "mplus_fast.cli", "eval", "harness"]}


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_lm_eval_command_line_runs_the_model(fact_ckpt, task_dir, tmp_path, command):
    out = tmp_path / "out"
    run = subprocess.run([*COMMAND_LINES[command], "--model", "mplus_fast",
                          "--model_args", f"pretrained={fact_ckpt},threads=1", "--tasks", "tiny_mc",
                          "--include_path", str(task_dir), "--output_path", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = list(out.rglob("results_*.json"))
    assert results and "tiny_mc" in json.loads(results[0].read_text())["results"]


def _fresh_python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


def test_the_plugin_registers_lazily_in_a_process_that_never_imported_mplus_fast():
    # What `lm_eval --model mplus_fast` does: lm-eval fills its registry, then looks the name up.
    out = _fresh_python("import sys\n"
                        "from lm_eval.api.registry import get_model, model_registry\n"
                        "import lm_eval.models\n"
                        "print('mplus_fast' in model_registry, 'torch' in sys.modules, 'mplus_fast' in sys.modules)\n"
                        "cls = get_model('mplus_fast')\n"
                        "print(cls.__module__, cls.__name__, get_model('dummy').__name__)")
    registered, lines = out.splitlines()[-2], out.splitlines()[-1]
    assert registered == "True False False"        # registered, nothing heavy imported yet
    assert lines == "mplus_fast.eval.harness MPlusLM DummyLM"


def test_the_plugin_leaves_other_processes_alone():
    out = _fresh_python("import sys; print('lm_eval' in sys.modules, 'torch' in sys.modules, "
                        "'mplus_fast_lm_eval_plugin' in sys.modules)")
    assert out == "False False True"               # loaded at start-up (the .pth), nothing imported by it


def test_registered_beside_the_harness_own_models():
    from lm_eval.api.registry import get_model
    harness.register()
    assert get_model("mplus_fast") is harness.MPlusLM
    assert get_model("dummy").__name__ == "DummyLM"

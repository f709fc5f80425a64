"""lm-evaluation-harness's `local-completions` against a live server, on a tiny local task:
loglikelihoods (echo + logprobs) equal the model's own, and generate_until runs with stop strings."""
from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("aiohttp")

import mplus_fast  # noqa: E402

from .conftest import MODEL  # noqa: E402

DOCS = [{"question": "Where is the copper key?", "choices": [" in the old desk", " at sea"], "label": 0, "answer": "desk"},
        {"question": "Who sailed the Pequod?", "choices": [" Ishmael", " Emma"], "label": 0, "answer": "Ishmael"}]


def write_tasks(folder):
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "mc.yaml").write_text("task: tiny_mplus_mc\n" + common + "output_type: multiple_choice\n"
                                    "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
                                    "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text("task: tiny_mplus_gen\n" + common + "output_type: generate_until\n"
                                     "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
                                     "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n"
                                     "metric_list:\n  - metric: exact_match\n")


def test_local_completions_on_a_tiny_task(server, text_ckpt, tmp_path):
    from lm_eval.tasks import TaskManager
    write_tasks(tmp_path)
    args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={text_ckpt},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1,max_length=512")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_mplus_mc", "tiny_mplus_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    assert 0.0 <= out["results"]["tiny_mplus_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["tiny_mplus_gen"]
    model = mplus_fast.load(text_ckpt, seed=0)          # the server's "default" memory is the checkpoint's
    tok = model.tokenizer
    for sample in out["samples"]["tiny_mplus_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole = tok.encode(context + continuation)
            ctx = tok.encode(context)
            cont = whole[len(ctx):]
            assert whole[:len(ctx)] == ctx
            ids = torch.tensor(ctx + cont)[None]
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            assert math.isclose(resp[0][0], want, rel_tol=1e-4, abs_tol=1e-4), (continuation, resp, want)
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["tiny_mplus_gen"])

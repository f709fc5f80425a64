"""The fine-tuning target: a loaded upstream-layout checkpoint trains its adapters and
retriever on a user's JSONL, the base stays frozen; bf16 trains float32 master weights."""
from __future__ import annotations

import json

import pytest
import torch

import mplus_fast
from mplus_fast.checkpoint import read_tensors
from mplus_fast.training import parse_config, train
from mplus_fast.training.trainable import MasterWeights, TrainableMPlus

pytest.importorskip("tokenizers")

CONFIG = """
seed = 0
threads = 1
checkpoint_every = 100
log_every = 5
[model]
init = "{ckpt}"
dtype = "{dtype}"
[tokenizer]
path = "{tok}"
[data]
kind = "jsonl"
path = "{data}"
[[stage]]
name = "ft"
steps = 6
lr = 1e-2
retriever_lr = 1e-2
warmup = 1
injections = 3
facts = 2
retrieve = 1.0
retriever_weight = 1.0
repeat_weight = 0.5
accumulate = 2
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A random upstream-layout checkpoint (vocab 300), a tokenizer for it and a JSONL file."""
    from mplus_fast.testing import make_random_checkpoint
    from mplus_fast.training.vocab import train_tokenizer
    root = tmp_path_factory.mktemp("ft")
    ckpt = make_random_checkpoint(root / "ckpt", seed=2, vocab_size=300, num_tokens=8, ltm_size=12, weight_std=0.02)
    texts = [f"the {w} keeps a {v} in the {u} box." for w in ("cat", "dog", "owl") for v in ("key", "pen") for u in ("red", "old")]
    tok = train_tokenizer(texts * 20, 300)
    tok.save(str(root / "tokenizer.json"))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"context": t, "question": f"Where is it {i}?", "answer": "in the box",
                                        "distractors": ["an owl flew by.", "the dog slept."]}) + "\n"
                            for i, t in enumerate(texts)))
    return ckpt, root / "tokenizer.json", data


def run(tmp_path, upstream, dtype):
    ckpt, tok, data = upstream
    text = CONFIG.format(ckpt=ckpt, tok=tok, data=data, dtype=dtype)
    import tomllib
    return train(parse_config(tomllib.loads(text), None, text), out=tmp_path / "run", show=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finetuning_trains_adapters_and_retriever_only(tmp_path, upstream, dtype):
    before = read_tensors(upstream[0])
    final = run(tmp_path, upstream, dtype)
    after = read_tensors(final)
    changed = {k for k in before if k in after and not k.startswith("mplus_fast.")
               and before[k].shape == after[k].shape and not torch.equal(before[k].to(after[k].dtype), after[k])}
    frozen = [k for k in changed if ("lora_" not in k and "query_proj" not in k and "key_proj" not in k
                                     and not k.startswith(("memory", "ltm", "cached_dropped", "update_step")))]
    assert not frozen, f"frozen base tensors changed: {frozen[:5]}"
    assert any(".lora_A.default." in k or ".lora_B.default." in k for k in changed), "the encoder adapter did not train"
    assert any(".lora_B.decoder_adapter." in k for k in changed), "the decoder adapter did not train"
    assert any("self_attn.key_proj" in k for k in changed) and any("self_attn.query_proj" in k for k in changed)
    assert not any("encoder_query_proj" in k for k in changed)
    model = mplus_fast.load(final, backend="fast")          # upstream layout: loads like any checkpoint
    assert model.config.vocab_size == 300
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == dtype


def test_bf16_master_weights_keep_small_updates(ckpt_factory):
    """A step far below bf16's resolution accumulates in the float32 master."""
    model = mplus_fast.load(ckpt_factory(seed=4), backend="reference", dtype=torch.bfloat16)
    tm = TrainableMPlus(model, ("adapters",))
    masters: MasterWeights = tm.masters["adapters"]
    t, m = masters.model[0], masters.master[0]
    assert t.dtype == torch.bfloat16 and m.dtype == torch.float32 and m is not t
    start = m.detach().clone()
    with torch.no_grad():
        for _ in range(10):
            m.add_(1e-4)      # each step is under half a bf16 ulp of values near 0.1 … 1
            masters.sync()
    assert torch.allclose(m - start, torch.full_like(m, 1e-3), atol=1e-6)
    assert torch.equal(t, m.to(torch.bfloat16))

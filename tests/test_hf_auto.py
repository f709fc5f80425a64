"""transformers' AutoConfig / AutoModelForCausalLM return our model, with the same outputs."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402

import mplus_fast  # noqa: E402
import mplus_fast.hf.auto as auto  # noqa: E402
from mplus_fast.testing import make_random_checkpoint  # noqa: E402


@pytest.mark.parametrize("arch", ["MPlus", "MemoryLLM"])
def test_auto_model_is_ours_with_the_same_outputs(tmp_path, arch):
    ckpt = make_random_checkpoint(tmp_path / arch, seed=4, architectures=[arch])
    (tmp_path / arch / "tokenizer.json").write_text("kept")       # other files of the folder stay
    auto.mark_for_auto(ckpt)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == auto.MODEL_TYPES[arch]
    cfg = AutoConfig.from_pretrained(ckpt)
    assert cfg.model_type == auto.MODEL_TYPES[arch]
    hf = AutoModelForCausalLM.from_pretrained(ckpt, seed=0)
    assert isinstance(hf, auto.MPlusForCausalLM)
    ours = mplus_fast.load(ckpt, seed=0)                          # still loads with our loader
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=0)
    gen = GenerationConfig(max_new_tokens=6, do_sample=False)
    assert torch.equal(hf.generate(ids, generation_config=gen), ours.generate(ids, max_new_tokens=6))
    assert (tmp_path / arch / "tokenizer.json").read_text() == "kept"


def test_unmarked_released_layout_loads_through_the_wrapper_class(tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "c", seed=4)            # model_type "llama", as released
    model = auto.MPlusForCausalLM.from_pretrained(ckpt, torch_dtype="float32")
    assert model.dtype == torch.float32 and model.memory_stats()["architecture"] == "MPlus"


def test_a_foreign_model_type_is_refused(tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "c", seed=4)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "model_type": "memoryllm"}))   # an M+ marked MemoryLLM
    with pytest.raises(mplus_fast.ConfigError, match="model_type='memoryllm'"):
        mplus_fast.load(ckpt)

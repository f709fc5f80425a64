"""Loading: upstream names, dtypes, and one clear error per kind of broken checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mplus_fast
from mplus_fast import CheckpointError, ConfigError


def rewrite(ckpt, tmp_path, edit_tensors=None, edit_config=None):
    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    if edit_tensors:
        t = load_file(str(out / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(out / "model.safetensors"))
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        mplus_fast.load(tmp_path / "nope")


def test_missing_weights_file(tiny_ckpt, tmp_path):
    out = rewrite(tiny_ckpt, tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mplus_fast.load(out)


def test_missing_tensor(tiny_ckpt, tmp_path):
    out = rewrite(tiny_ckpt, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.lora_B.decoder_adapter.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.self_attn\.k_proj\.lora_B\.decoder_adapter"):
        mplus_fast.load(out)


def test_unexpected_tensor(tiny_ckpt, tmp_path):
    out = rewrite(tiny_ckpt, tmp_path, lambda t: t.__setitem__("model.layers.7.foo", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.foo' \(2,\)"):
        mplus_fast.load(out)


def test_shape_mismatch(tiny_ckpt, tmp_path):
    out = rewrite(tiny_ckpt, tmp_path, lambda t: t.__setitem__("memory", torch.zeros(2, 15, 48)))
    with pytest.raises(CheckpointError, match=r"'memory' has shape \(2, 15, 48\), expected \(2, 16, 48\)"):
        mplus_fast.load(out)


@pytest.mark.parametrize("field,value,match", [
    ("architectures", ["GPT2"], "architectures"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "yarn"),
    ("hidden_act", "swish2", "hidden_act"),
    ("num_ltm_blocks", 9, "num_ltm_blocks"),
    ("update_ltm_mode", "lazy", "update_ltm_mode"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
])
def test_unsupported_config(tiny_ckpt, tmp_path, field, value, match):
    out = rewrite(tiny_ckpt, tmp_path, edit_config=lambda c: c.__setitem__(field, value))
    with pytest.raises(ConfigError, match=match):
        mplus_fast.load(out)


def test_missing_config_field(tiny_ckpt, tmp_path):
    out = rewrite(tiny_ckpt, tmp_path, edit_config=lambda c: c.pop("hidden_size"))
    with pytest.raises(ConfigError, match="hidden_size"):
        mplus_fast.load(out)


def test_unknown_backend(tiny_ckpt):
    with pytest.raises(ValueError, match="backend='turbo'"):
        mplus_fast.load(tiny_ckpt, backend="turbo")


def test_dtype_and_ages(tiny_ckpt):
    m = mplus_fast.load(tiny_ckpt, dtype=torch.bfloat16)
    assert m.weights.embed.dtype == torch.bfloat16 and m.state.stm.dtype == torch.bfloat16
    assert m.state.ltm_ages[0].dtype == torch.int64
    m32 = mplus_fast.load(tiny_ckpt)
    assert m32.dtype == torch.float32


def test_fixture_loads_with_upstream_names(fixtures_dir):
    m = mplus_fast.load(fixtures_dir / "upstream_tiny" / "ckpt")
    assert m.config.stm_size == 16 and m.config.ltm_retrieved == 4
    assert m.state.ltm_sizes() == [10, 10]
    stats = m.memory_stats()
    assert stats["pending_tokens"] == 0 and stats["memory_bytes_by_device"]["cpu"] > 0
    assert set(m.weights.layers[0].selectors) == {"query_proj", "key_proj", "encoder_query_proj"}

"""save_pretrained → load continues exactly; the save is atomic; the layout is the upstream one."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mplus_fast
from mplus_fast import checkpoint as ckpt_mod


def stream(model, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        model.inject_memory(torch.randint(3, model.config.vocab_size, (1, 9), generator=g), update_memory=True)


def assert_same_state(a, b):
    ta, tb = a.state_tensors(), b.state_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_save_reload_continue_equals_never_saving(tiny_ckpt, tmp_path, backend):
    straight = mplus_fast.load(tiny_ckpt, seed=11, backend=backend)
    paused = mplus_fast.load(tiny_ckpt, seed=11, backend=backend)
    stream(straight, 7, seed=1)
    stream(paused, 7, seed=1)
    assert paused.state.pending_len() > 0, "test should save with a non-empty pending buffer"
    paused.save_pretrained(tmp_path / "mid")
    resumed = mplus_fast.load(tmp_path / "mid", seed=999, backend=backend)  # the saved generator state wins over the seed
    assert_same_state(paused, resumed)
    stream(straight, 6, seed=2)
    stream(resumed, 6, seed=2)
    assert_same_state(straight, resumed)
    q = torch.tensor([[5, 6, 7, 8, 9]])
    a, b = straight(q), resumed(q)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(x, y) for x, y in zip(a.ltm_indices, b.ltm_indices))
    s1 = straight.generate(q, max_new_tokens=5, do_sample=True, top_k=20)
    s2 = resumed.generate(q, max_new_tokens=5, do_sample=True, top_k=20)
    assert torch.equal(s1, s2)


def test_saved_layout_is_upstream(tiny_model, tmp_path):
    stream(tiny_model, 3, seed=0)
    out = tiny_model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MPlus"] and cfg["num_tokens"] == 4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("ltm_ages.0").dtype == torch.float32
        assert f.get_tensor("memory_ages.0").dtype == torch.int64
        assert f.get_tensor("cached_dropped_memory_ages.0").dtype == torch.int64
    for n in ["memory", "bos_embedding", "new_memory_positional_emb", "ltm.1", "ltm_keys.1", "ltm_recall_frequencies.0",
              "model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.1.mlp.down_proj.lora_B.decoder_adapter.weight",
              "model.layers.0.self_attn.encoder_query_proj.2.weight", "cached_dropped_memories.0", "update_step"]:
        assert n in names, n
    assert all(not n.startswith("mplus") or n.startswith("mplus_fast.") for n in names)


def test_sharded_save_and_load(tiny_model, tmp_path):
    out = tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    again = mplus_fast.load(out, backend=tiny_model.backend_name)
    assert_same_state(tiny_model, again)


def test_failed_save_keeps_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    target = tiny_model.save_pretrained(tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()
    stream(tiny_model, 2, seed=4)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tiny_model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert not [p.name for p in target.iterdir() if p.name.startswith(".")], "temporary files left behind"
    mplus_fast.load(target)  # still a valid checkpoint


def test_save_over_a_file_is_refused(tiny_model, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(mplus_fast.CheckpointError, match="not a directory"):
        tiny_model.save_pretrained(f)

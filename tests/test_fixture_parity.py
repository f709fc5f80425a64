"""Parity with the authors' reference outputs (tests/fixtures, made by the authors' code): every row."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mplus_fast
from conftest import rel_err

FIXTURES = ["upstream_tiny", "upstream_tiny_memoryllm"]


@pytest.fixture(params=FIXTURES)
def case(request, fixtures_dir, backend):
    root = fixtures_dir / request.param
    return request.param, mplus_fast.load(root / "ckpt", seed=0, backend=backend), load_file(str(root / "expected.safetensors"))


def test_logits(case):
    name, model, e = case
    out = model(e["query"])
    assert out.logits.dtype == torch.float32
    assert out.logits.shape == e["logits"].shape
    err = rel_err(out.logits, e["logits"])
    assert err < 1e-5, f"{name}: logits relative error {err:.2e}"


def test_ltm_indices(case):
    name, model, e = case
    out = model(e["query"])
    if name == "upstream_tiny_memoryllm":
        assert all(i.numel() == 0 for i in out.ltm_indices)
        return
    for layer in range(model.config.num_hidden_layers):
        assert out.ltm_indices[layer][0].tolist() == e[f"ltm_indices.{layer}"].tolist(), f"layer {layer}"


def test_greedy_generation(case):
    name, model, e = case
    n_new = e["generated"].shape[1] - e["query"].shape[1]
    got = model.generate(e["query"], max_new_tokens=n_new, eos_token_id=[])
    assert got.tolist() == e["generated"].tolist()


@pytest.mark.parametrize("ctx_key,delta_key", [("ctx", "delta_memory"), ("short_ctx", "delta_memory_short")])
def test_injection(case, ctx_key, delta_key):
    name, model, e = case
    before = model.state.stm.clone()
    delta = model.inject_memory(e[ctx_key], update_memory=False)
    assert delta.shape == e[delta_key].shape
    err = rel_err(delta, e[delta_key])
    assert err < 1e-5, f"{name}/{ctx_key}: delta relative error {err:.2e}"
    assert torch.equal(model.state.stm, before), "injection without update changed the memory"


def test_reads_do_not_change_state(case):
    name, model, e = case
    snapshot = model.state_tensors()
    model(e["query"])
    model.generate(e["query"], max_new_tokens=3)
    after = model.state_tensors()
    for k, v in snapshot.items():
        if k.endswith("generator_state"):
            continue
        assert torch.equal(after[k], v), k

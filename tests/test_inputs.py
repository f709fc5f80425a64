"""Bad input raises ValueError/TypeError naming the problem, and leaves the memory unchanged."""
from __future__ import annotations

import pytest
import torch


def snapshot(model):
    return {k: v.clone() for k, v in model.state_tensors().items()}


BAD = [
    (torch.tensor([[]], dtype=torch.long), ValueError, "empty"),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "1-D .* or 2-D"),
    (torch.tensor([[5, 96]]), ValueError, "token id 96, outside the vocabulary"),
    (torch.tensor([[5, -1]]), ValueError, "token id -1"),
    (torch.tensor([[5.0, 6.0]]), TypeError, "integer token ids"),
    ([[5, 6]], TypeError, "torch.Tensor"),
    (torch.tensor([[5, 6]], device="meta"), ValueError, "is on meta"),
]


@pytest.mark.parametrize("ids,exc,match", BAD)
@pytest.mark.parametrize("call", ["forward", "inject", "inject_update", "generate"])
def test_bad_ids(tiny_model, ids, exc, match, call):
    before = snapshot(tiny_model)
    with pytest.raises(exc, match=match):
        if call == "forward":
            tiny_model(ids)
        elif call == "inject":
            tiny_model.inject_memory(ids)
        elif call == "inject_update":
            tiny_model.inject_memory(ids, update_memory=True)
        else:
            tiny_model.generate(ids, max_new_tokens=2)
    after = snapshot(tiny_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mask,match", [
    (torch.ones(1, 3), "has shape"),
    (torch.tensor([[1, 1, 0, 1]]), "left-padded"),
    (torch.tensor([[0, 0, 0, 0]]), "no real token"),
    (torch.tensor([[2, 1, 1, 1]]), "only 0 and 1"),
])
def test_bad_attention_mask(tiny_model, mask, match):
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=match):
        tiny_model.inject_memory(torch.tensor([[5, 6, 7, 8]]), update_memory=True, attention_mask=mask)
    with pytest.raises(ValueError, match=match):
        tiny_model(torch.tensor([[5, 6, 7, 8]]), attention_mask=mask)
    assert all(torch.equal(before[k], v) for k, v in snapshot(tiny_model).items())


def test_failure_inside_update_leaves_memory_unchanged(tiny_model, monkeypatch):
    before = snapshot(tiny_model)

    def broken_keys(l, rows):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_model.backend, "retrieval_keys", broken_keys)
    with pytest.raises(RuntimeError, match="boom"):
        tiny_model.inject_memory(torch.tensor([[5, 6, 7, 8, 9]]), update_memory=True)
    after = snapshot(tiny_model)
    for k in before:
        if not k.endswith("generator_state"):  # the draw happened; nothing else may change
            assert torch.equal(before[k], after[k]), k


def test_an_unindexed_cuda_device_is_resolved(monkeypatch):
    """device="cuda" must equal the device GPU tensors report (cuda:N), or every input is refused."""
    from mplus_fast.model import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")

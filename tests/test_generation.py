from __future__ import annotations

import pytest
import torch

import mplus_fast
from mplus_fast.sampling import filter_logits


def test_greedy_equals_argmax_of_forward(ckpt_factory):
    # MemoryLLM: no retrieval, so re-reading the grown sequence sees the same memory prefix as the
    # cached decode steps (M+ retrieves once per prompt, so a re-read would retrieve differently).
    model = mplus_fast.load(ckpt_factory(architectures=["MemoryLLM"]))
    q = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(q, max_new_tokens=4, eos_token_id=[])
    seq = q
    for _ in range(4):  # no cache: re-read the whole sequence each time
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_with_seed(tiny_ckpt):
    q = torch.tensor([[5, 6, 7, 8]])
    a = mplus_fast.load(tiny_ckpt, seed=42).generate(q, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, eos_token_id=[])
    b = mplus_fast.load(tiny_ckpt, seed=42).generate(q, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, eos_token_id=[])
    c = mplus_fast.load(tiny_ckpt, seed=43).generate(q, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, eos_token_id=[])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eos_stops_and_pads(tiny_model):
    q = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    free = tiny_model.generate(q, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 5])  # the 2nd new token of row 0 becomes its end-of-sequence
    out = tiny_model.generate(q, max_new_tokens=6, eos_token_id=[eos], pad_token_id=0)
    row0 = out[0, 4:].tolist()
    stop = row0.index(eos)
    assert row0[: stop + 1] == free[0, 4:4 + stop + 1].tolist()
    assert all(t == 0 for t in row0[stop + 1:])
    if eos not in free[1, 4:].tolist():
        assert out.shape[1] == 10 and out[1, 4:].tolist() == free[1, 4:].tolist()


def test_all_finished_stops_early(tiny_model):
    q = torch.tensor([[5, 6, 7, 8]])
    first = int(tiny_model.generate(q, max_new_tokens=1)[0, -1])
    out = tiny_model.generate(q, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (1, 5)


def test_top_k_top_p_filters():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, None)[0, :2]).all()
    # probabilities 0.03, 0.09, 0.24, 0.64: the smallest set reaching 0.5 is the top token alone,
    # reaching 0.7 it is the top two
    assert (~torch.isinf(filter_logits(logits, 1.0, None, 0.5))).tolist() == [[False, False, False, True]]
    assert (~torch.isinf(filter_logits(logits, 1.0, None, 0.7))).tolist() == [[False, False, True, True]]
    assert (~torch.isinf(filter_logits(logits, 1.0, None, 1.0))).all()


@pytest.mark.parametrize("kwargs,match", [({"max_new_tokens": -1}, "max_new_tokens"),
                                          ({"do_sample": True, "temperature": 0}, "temperature"),
                                          ({"do_sample": True, "top_p": 1.5}, "top_p"),
                                          ({"eos_token_id": 10**6}, "eos_token_id")])
def test_bad_generation_options(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(torch.tensor([[5, 6]]), **kwargs)

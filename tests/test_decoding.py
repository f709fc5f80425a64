"""The fast backend's static decoder (device-side state, CUDA graph on a GPU) against the plain
per-token loop: same tokens and the same generator state afterwards, for greedy and sampled
decoding, EOS stops, padding and batches; and its on-device sampling against torch.multinomial."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mplus_fast
from mplus_fast import generation
from mplus_fast.config import MPlusConfig
from mplus_fast.rope import RotaryEmbedding
from mplus_fast.sampling import exponential_noise
from mplus_fast.testing import _config_dict, make_random_checkpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("shape", [(1, 7), (3, 96), (2, 32000)])
def test_noise_argmax_is_multinomial(shape):
    for seed in range(10):
        p = torch.rand(shape, generator=torch.Generator().manual_seed(100 + seed)) ** 6
        p[:, : shape[1] // 3] = 0                      # zero-probability entries are never chosen
        p = p / p.sum(-1, keepdim=True)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(p, 1, generator=g1)[:, 0]
        got = (p / exponential_noise(shape, g2)).argmax(-1)
        assert torch.equal(got, expected)
        assert torch.equal(g1.get_state(), g2.get_state())


def _pair(path, device="cpu", **kw):
    return (mplus_fast.load(path, seed=11, device=device, **kw), mplus_fast.load(path, seed=11, device=device, **kw))


def _generate_both(monkeypatch, a, b, q, **kw):
    """`a` through the plain loop, `b` through the static decoder; returns both outputs."""
    with monkeypatch.context() as mp:
        mp.setattr(generation, "use_static_decoder", lambda *args: False)
        loop = a.generate(q, **kw)
    used = []
    real = generation.StaticDecoder
    with monkeypatch.context() as mp:
        mp.setattr(generation, "StaticDecoder", lambda *args, **k: used.append(1) or real(*args, **k))
        static = b.generate(q, **kw)
    assert used, "the static decoder was not used"
    return loop, static


SAMPLING = [dict(), dict(do_sample=True), dict(do_sample=True, temperature=0.7, top_k=20),
            dict(do_sample=True, temperature=1.4, top_p=0.8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", SAMPLING)
def test_static_equals_loop(tmp_path, monkeypatch, device, opts):
    a, b = _pair(make_random_checkpoint(tmp_path / "c", seed=5), device)
    q = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]], device=device)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    kw = dict(attention_mask=mask, max_new_tokens=9, eos_token_id=[], **opts)
    loop, static = _generate_both(monkeypatch, a, b, q, **kw)
    assert torch.equal(loop, static)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    # a second call continues the same random stream in both
    loop, static = _generate_both(monkeypatch, a, b, q, **kw)
    assert torch.equal(loop, static)


@pytest.mark.parametrize("do_sample", [False, True])
def test_static_eos_stop_and_generator(tmp_path, monkeypatch, do_sample):
    path = make_random_checkpoint(tmp_path / "c", seed=6)
    q = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for rows in (q, q[:1]):               # with one row, its EOS stops the whole call early
        free = mplus_fast.load(path, seed=11).generate(rows, max_new_tokens=8, do_sample=do_sample, eos_token_id=[])
        for eos_at in (0, 2, 5):           # row 0's k-th new token ends it (and maybe row 1 too)
            eos = int(free[0, 4 + eos_at])
            a, b = _pair(path)
            kw = dict(max_new_tokens=8, do_sample=do_sample, eos_token_id=[eos], pad_token_id=1)
            loop, static = _generate_both(monkeypatch, a, b, rows, **kw)
            assert torch.equal(loop, static)
            assert torch.equal(a.generator.get_state(), b.generator.get_state())
            if rows.shape[0] == 1:
                assert loop.shape[1] <= 4 + eos_at + 1


def test_static_all_finished_after_first_token(tmp_path, monkeypatch):
    path = make_random_checkpoint(tmp_path / "c", seed=6)
    q = torch.tensor([[5, 6, 7, 8]])
    first = int(mplus_fast.load(path, seed=11).generate(q, max_new_tokens=1, do_sample=True)[0, -1])
    a, b = _pair(path)
    loop, static = _generate_both(monkeypatch, a, b, q, max_new_tokens=6, do_sample=True, eos_token_id=[first])
    assert static.shape == (1, 5) and torch.equal(loop, static)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_static_matches_reference_backend(tmp_path):
    path = make_random_checkpoint(tmp_path / "c", seed=7, weight_std=0.05)
    q = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ref = mplus_fast.load(path, seed=3, backend="reference").generate(q, max_new_tokens=10, eos_token_id=[])
    fast = mplus_fast.load(path, seed=3, backend="fast").generate(q, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(ref, fast)


def test_dynamic_rope_growth_uses_the_step_loop(tmp_path, monkeypatch):
    """Positions that cross max_position_embeddings change dynamic-NTK frequencies mid-decode:
    the static decoder (fixed frequencies) must not be used, and results equal the reference."""
    path = make_random_checkpoint(tmp_path / "c", seed=8, weight_std=0.05, max_position_embeddings=20,
                                  rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    q = torch.tensor([[5, 6, 7, 8]])
    model = mplus_fast.load(path, seed=1)
    p0 = model.config.read_prefix_len + q.shape[1]
    if p0 + 8 <= 20:
        pytest.skip("prefix too short to cross max_position_embeddings")
    calls = []
    monkeypatch.setattr(generation, "StaticDecoder", lambda *a, **k: calls.append(1))
    out = model.generate(q, max_new_tokens=6, eos_token_id=[])
    ref = mplus_fast.load(path, seed=1, backend="reference").generate(q, max_new_tokens=6, eos_token_id=[])
    assert not calls and torch.equal(out, ref)


def _simulate(rope: RotaryEmbedding, first: int, last: int) -> bool:
    before = rope.state()
    for p in range(first, last + 1):
        f = rope.inv_freq_for(p)
        if not torch.equal(f, before["inv_freq"]):
            return False
    return rope.cached_len == before["cached_len"]


@settings(max_examples=60, deadline=None)
@given(cached=st.integers(10, 60), first=st.integers(0, 60), span=st.integers(0, 30))
def test_fixed_over_matches_simulated_calls(cached, first, span):
    cfg = MPlusConfig.from_dict(_config_dict(dict(max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0})))
    rope = RotaryEmbedding(cfg)
    rope.inv_freq_for(cached - 1)       # reach a state with cached_len ≥ max_pos
    expected_state = rope.state()
    predicted = rope.fixed_over(first, first + span)
    assert predicted == _simulate(rope, first, first + span)
    rope.load_state(expected_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("opts", SAMPLING[:2])
def test_cuda_graph_equals_eager(tmp_path, monkeypatch, opts):
    path = make_random_checkpoint(tmp_path / "c", seed=5)
    q = torch.tensor([[5, 6, 7, 8]], device="cuda")
    a, b = _pair(path, "cuda")
    monkeypatch.setenv("MPLUS_FAST_CUDA_GRAPHS", "0")
    eager = a.generate(q, max_new_tokens=12, eos_token_id=[], **opts)
    monkeypatch.setenv("MPLUS_FAST_CUDA_GRAPHS", "1")
    graphs = []
    real = generation.StaticDecoder

    def spy(*args, **k):
        d = real(*args, **k)
        graphs.append(d)
        return d
    monkeypatch.setattr(generation, "StaticDecoder", spy)
    graph = b.generate(q, max_new_tokens=12, eos_token_id=[], **opts)
    assert graphs and graphs[0].graph is not None, "the decode step was not captured"
    assert torch.equal(eager, graph)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())

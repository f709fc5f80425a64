"""RoPE variants (SPEC §1) and the bf16 rounding of inverse frequencies (SPEC §6)."""
from __future__ import annotations

import math

import pytest
import torch

import mplus_fast
from mplus_fast.config import MPlusConfig
from mplus_fast.rope import RotaryEmbedding, apply_rope, default_inv_freq
from mplus_fast.testing import _config_dict


def cfg(**over):
    return MPlusConfig.from_dict(_config_dict(dict(over)))


def test_default_and_linear():
    c = cfg(head_dim=12, rope_theta=10000.0)
    base = RotaryEmbedding(c).inv_freq_for(10)
    assert torch.allclose(base, 1.0 / 10000 ** (torch.arange(0, 12, 2).float() / 12))
    lin = RotaryEmbedding(cfg(rope_scaling={"type": "linear", "factor": 1.8125})).inv_freq_for(10)
    assert torch.allclose(lin, base / 1.8125)


def test_llama3_bands():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    c = cfg(head_dim=32, rope_theta=500000.0, rope_scaling=scaling)
    inv = RotaryEmbedding(c).inv_freq_for(10)
    ref = default_inv_freq(500000.0, 32)
    wavelen = 2 * math.pi / ref
    high = wavelen < 64 / 4.0
    low = wavelen > 64 / 1.0
    assert torch.equal(inv[high], ref[high])          # high frequencies untouched
    assert torch.allclose(inv[low], ref[low] / 8.0)   # low frequencies scaled by the factor
    mid = ~high & ~low
    assert mid.any() and ((inv[mid] < ref[mid]) & (inv[mid] > ref[mid] / 8.0)).all()


def test_dynamic_grows_and_resets():
    c = cfg(head_dim=12, rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32)
    rope = RotaryEmbedding(c)
    orig = rope.inv_freq_for(10).clone()
    grown = rope.inv_freq_for(63).clone()  # seq_len 64 > 32: base grows
    base = 10000.0 * ((2.0 * 64 / 32) - 1) ** (12 / 10)
    assert torch.allclose(grown, default_inv_freq(base, 12))
    assert torch.equal(rope.inv_freq_for(40), grown)  # within the cached length: kept
    assert torch.equal(rope.inv_freq_for(5), orig)    # back under max_position_embeddings: reset


def test_bf16_rounds_initial_inv_freq():
    c = cfg()
    rope = RotaryEmbedding(c, round_inv_freq_to=torch.bfloat16)
    assert torch.equal(rope.inv_freq_for(3), default_inv_freq(10000.0, 12).to(torch.bfloat16).float())


def test_apply_rope_rotates_pairs():
    x = torch.randn(1, 2, 5, 8)
    inv = default_inv_freq(10000.0, 8)
    pos = torch.arange(5)
    y = apply_rope(x, pos, inv)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    assert torch.allclose(y[:, :, 0], x[:, :, 0])                        # position 0: identity
    # relative property: <R_p q, R_p k> depends only on the offset
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    d1 = (apply_rope(q, torch.tensor([7]), inv) * apply_rope(k, torch.tensor([3]), inv)).sum()
    d2 = (apply_rope(q, torch.tensor([14]), inv) * apply_rope(k, torch.tensor([10]), inv)).sum()
    assert torch.allclose(d1, d2, atol=1e-5)


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_models_run_with_every_rope_variant(ckpt_factory, scaling):
    m = mplus_fast.load(ckpt_factory(rope_scaling=scaling, max_position_embeddings=30))
    out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 6)
    assert torch.isfinite(m(torch.tensor([[5, 6, 7]])).logits).all()

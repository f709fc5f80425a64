"""Our RoPE variants and Llama layers against transformers' own implementations, random weights.

RoPE: inverse frequencies (default, linear, dynamic before and after growth, llama3), cos/sin and
the rotation itself. Layers: a MemoryLLM whose memory is not initialized reads as the plain
backbone (SPEC §9) with its decoder adapter, so its logits must equal transformers'
`LlamaForCausalLM` carrying the merged weights W + (alpha/r)·B·A — on both backends, and greedy
generation token for token.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

import mplus_fast  # noqa: E402
from mplus_fast.config import MPlusConfig  # noqa: E402
from mplus_fast.model import MPlus  # noqa: E402
from mplus_fast.rope import RotaryEmbedding, apply_rope, rope_cos_sin  # noqa: E402
from mplus_fast.testing import TINY_MPLUS, random_tensors  # noqa: E402
from mplus_fast.weights import reading_adapter  # noqa: E402

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}
GEOMETRY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, vocab_size=96, rms_norm_eps=1e-6, max_position_embeddings=128,
                rope_theta=10000.0)


def configs(rope):
    ours = MPlusConfig.from_dict({**TINY_MPLUS, **GEOMETRY, "rope_scaling": rope})
    hf = LlamaConfig(**GEOMETRY, rope_scaling=dict(rope) if rope else None, attn_implementation="eager")
    return ours, hf


@pytest.mark.parametrize("variant", list(ROPES))
def test_rope_inverse_frequencies_and_rotation_equal_transformers(variant):
    ours, hf = configs(ROPES[variant])
    rope, ref = RotaryEmbedding(ours), LlamaRotaryEmbedding(hf)
    torch.testing.assert_close(rope.inv_freq_for(10), ref.inv_freq.float(), rtol=0, atol=0)
    x = torch.randn(2, 4, 37, 12, generator=torch.Generator().manual_seed(1))
    for last in (37, 300) if variant == "dynamic" else (37,):   # 300 > max_position_embeddings: dynamic growth
        pos = torch.arange(last - 37, last)[None]
        cos_ref, sin_ref = ref(x, pos)
        inv = rope.inv_freq_for(last - 1)
        torch.testing.assert_close(inv, ref.inv_freq.float(), rtol=0, atol=0)
        cos, sin = rope_cos_sin(pos[0], inv, x.dtype, ref.attention_scaling)
        torch.testing.assert_close(cos, cos_ref[0], rtol=0, atol=0)
        torch.testing.assert_close(sin, sin_ref[0], rtol=0, atol=0)
        q_ref, _ = apply_rotary_pos_emb(x, x, cos_ref, sin_ref)
        torch.testing.assert_close(apply_rope(x, pos[0], inv, ref.attention_scaling), q_ref, rtol=0, atol=0)


def memoryllm_backbone(rope, backend):
    """A MemoryLLM with an uninitialized memory (reads = the plain backbone) and the same weights,
    merged with the decoder adapter, in transformers' LlamaForCausalLM."""
    cfg = MPlusConfig.from_dict({**TINY_MPLUS, **GEOMETRY, "rope_scaling": rope, "architectures": ["MemoryLLM"]})
    tensors = random_tensors(cfg, seed=7)
    tensors["initialized"] = torch.tensor(0, dtype=torch.uint8)
    ours = MPlus(cfg, tensors, backend=backend, seed=0)
    ref_model = MPlus(cfg, tensors, backend="reference", seed=0)      # unfused weights, for the merge
    adapter = reading_adapter(cfg)
    sd = {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"], "model.norm.weight": tensors["model.norm.weight"],
          "lm_head.weight": tensors["lm_head.weight"]}
    for i, layer in enumerate(ref_model.weights.layers):
        p = f"model.layers.{i}."
        sd[f"{p}input_layernorm.weight"] = layer.input_norm
        sd[f"{p}post_attention_layernorm.weight"] = layer.post_norm
        sd[f"{p}self_attn.o_proj.weight"] = layer.o_proj
        for name in ("q_proj", "k_proj", "v_proj"):
            sd[f"{p}self_attn.{name}.weight"] = layer.proj[name].effective_weight(adapter)
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[f"{p}mlp.{name}.weight"] = layer.proj[name].effective_weight(adapter)
    _, hf_cfg = configs(rope)
    hf = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ours, hf


@pytest.mark.parametrize("variant", ["default", "llama3", "linear"])
def test_llama_layers_equal_transformers(variant, backend):
    ours, hf = memoryllm_backbone(ROPES[variant], backend)
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids).logits
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-5, f"{backend}/{variant}: logits differ from transformers by {err:.2e} (relative max)"
    new = ours.generate(ids[:1], max_new_tokens=8, eos_token_id=[])
    ref = hf.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                      min_new_tokens=8)
    assert new.tolist() == ref.tolist()

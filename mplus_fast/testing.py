"""Test utilities: small random checkpoints in the exact upstream layout (SPEC §8).

`make_random_checkpoint(dir, **config)` writes config.json, generation_config.json and
model.safetensors (float32, non-zero LoRA B so both adapters matter), for tests, benchmarks and
the demo. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mplus_fast.config import MPlusConfig
from mplus_fast.weights import expected_weight_shapes

TINY_MPLUS = dict(
    architectures=["MPlus"], vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_tokens=4, num_blocks=5, num_ltm_blocks=1,
    ltm_initial_size=10, selector_hidden_dim=8, num_selector_layers=2, update_ltm_frequency=2,
    decay_frequency=1, initial_rf_when_moving_stm_to_ltm=2, max_position_embeddings=4096,
    lora_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "inference_mode": True,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
)


def _config_dict(overrides: dict) -> dict:
    raw = {**TINY_MPLUS, **overrides}
    if raw["architectures"] == ["MemoryLLM"]:
        for k in ("num_ltm_blocks", "ltm_initial_size", "selector_hidden_dim", "num_selector_layers",
                  "update_ltm_frequency", "decay_frequency", "initial_rf_when_moving_stm_to_ltm"):
            raw.pop(k, None)
            overrides.pop(k, None)
    raw.setdefault("model_type", "llama")
    raw.setdefault("bos_token_id", 1)
    raw.setdefault("eos_token_id", 2)
    raw.setdefault("rms_norm_eps", 1e-6)
    raw.setdefault("hidden_act", "silu")
    return raw


def random_tensors(config: MPlusConfig, seed: int = 0, ltm_size: int | None = None,
                   weight_std: float | None = None) -> dict[str, torch.Tensor]:
    """Random tensors for every name of the layout. Linear weights are N(0, 1/fan_in) by default
    (lively outputs), or N(0, weight_std²): small weights (e.g. 0.02, Llama's initializer_range)
    keep the memory write → read → write loop contractive, so two backends whose float32
    roundings differ stay together over hundreds of injections instead of diverging chaotically."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for name, shape in expected_weight_shapes(config).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "new_memory_positional_emb":
            t[name] = 0.1 * torch.randn(shape, generator=g)
        elif name == "bos_embedding":
            t[name] = torch.randn(shape, generator=g)
        else:
            std = weight_std if weight_std is not None else shape[-1] ** -0.5
            t[name] = torch.randn(shape, generator=g) * std
    L, d = config.num_hidden_layers, config.hidden_size
    t["memory"] = torch.randn(L, config.stm_size, d, generator=g)
    if config.is_mplus:
        n = config.ltm_initial_size if ltm_size is None else ltm_size
        for i in range(L):
            t[f"ltm.{i}"] = torch.randn(n, d, generator=g)
            t[f"ltm_keys.{i}"] = torch.randn(n, config.selector_hidden_dim, generator=g)
            t[f"ltm_ages.{i}"] = torch.randperm(max(n, 1), generator=g)[:n].float() * 3
            t[f"ltm_recall_frequencies.{i}"] = torch.zeros(n)
    else:
        t["initialized"] = torch.tensor(1, dtype=torch.uint8)
    return t


def make_random_checkpoint(path, seed: int = 0, ltm_size: int | None = None, weight_std: float | None = None,
                           **config) -> Path:
    """Write a random checkpoint (upstream layout, float32) to `path`; keyword args override the
    tiny default config (e.g. hidden_size=1024, num_hidden_layers=8, rope_scaling={...})."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = _config_dict(dict(config))
    cfg = MPlusConfig.from_dict(dict(raw))
    save_file({k: v.contiguous() for k, v in random_tensors(cfg, seed, ltm_size, weight_std).items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": raw.get("bos_token_id"), "eos_token_id": raw.get("eos_token_id")}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return path

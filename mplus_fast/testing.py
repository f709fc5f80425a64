"""Test utilities: small random checkpoints in the exact upstream layout (SPEC §8), and random
models of any size built in place.

`make_random_checkpoint(dir, **config)` writes config.json, generation_config.json and
model.safetensors (float32, non-zero LoRA B so both adapters matter), for tests, benchmarks and
the demo. `random_model(config, device=..., dtype=..., ltm_tokens=...)` builds a fast-backend
`MPlus` directly on the device with a synthetic LTM bank, for benchmarks at the released size
(`RELEASED_MPLUS`, `RELEASED_LTM_TOKENS`) with no checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mplus_fast.config import MPlusConfig
from mplus_fast.model import LTM_PLACEMENTS, MPlus, resolve_device
from mplus_fast.weights import expected_weight_shapes

# Random checkpoints use the Llama ids 0 (unk), 1 (bos) and 2 (eos); synthetic text starts after
# them (an input that starts with the BOS id is refused: M+ has its own learned BOS).
FIRST_PLAIN_ID = 3

TINY_MPLUS = dict(
    architectures=["MPlus"], vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_tokens=4, num_blocks=5, num_ltm_blocks=1,
    ltm_initial_size=10, selector_hidden_dim=8, num_selector_layers=2, update_ltm_frequency=2,
    decay_frequency=1, initial_rf_when_moving_stm_to_ltm=2, max_position_embeddings=4096,
    lora_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "inference_mode": True,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
)

# The released M+ 8B geometry (SPEC §8 values; a Llama-3.1-8B backbone). N = 40 × 256 = 10,240
# STM tokens, R = 10 × 256 = 2,560 retrieved, at most 10 × 60 × 256 = 153,600 LTM tokens per layer.
# The RoPE variant does not change the cost (inverse frequencies are computed once).
RELEASED_MPLUS = dict(
    architectures=["MPlus"], vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_tokens=256, num_blocks=50, num_ltm_blocks=10,
    ltm_initial_size=0, selector_hidden_dim=256, num_selector_layers=2, update_ltm_frequency=60, decay_frequency=1,
    initial_rf_when_moving_stm_to_ltm=10, rope_theta=500_000.0, max_position_embeddings=131_072,
    bos_token_id=128_000, eos_token_id=128_001,
    lora_config={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "inference_mode": True,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
)
RELEASED_LTM_TOKENS = 153_600


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


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator, weight_std: float | None,
                  **factory) -> torch.Tensor:
    """One fixed tensor of the layout, drawn from `generator` (on its device, in `factory`'s dtype).
    Scaled in place, so a released-size draw never holds a second copy."""
    x = torch.randn(shape, generator=generator, **factory)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return x.mul_(0.1).add_(1.0)
    if name == "new_memory_positional_emb":
        return x.mul_(0.1)
    if name == "bos_embedding":
        return x
    return x.mul_(weight_std if weight_std is not None else shape[-1] ** -0.5)


def random_tensors(config: MPlusConfig, seed: int = 0, ltm_size: int | None = None,
                   weight_std: float | None = None) -> dict[str, torch.Tensor]:
    """Random tensors for every name of the layout. Linear weights are N(0, 1/fan_in) by default
    (lively outputs), or N(0, weight_std²): small weights (e.g. 0.02, Llama's initializer_range)
    keep the memory write → read → write loop contractive, so two backends whose float32
    roundings differ stay together over hundreds of injections instead of diverging chaotically."""
    g = torch.Generator().manual_seed(seed)
    t = {name: random_weight(name, shape, g, weight_std) for name, shape in expected_weight_shapes(config).items()}
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


def random_model(config: MPlusConfig, *, device, dtype: torch.dtype, ltm_tokens: int = 0,
                 ltm_placement: str = "device", backend: str = "fast", seed: int = 0, weight_std: float = 0.02,
                 chunk_rows: int = 16_384) -> MPlus:
    """A random fast-backend `MPlus` built in place: every weight and the STM drawn on `device` in
    `dtype` (never a float32 host copy of the model), then `ltm_tokens` synthetic rows per layer
    appended to the LTM bank (`FastBackend.add_synthetic_ltm`: no hidden states, so the model
    cannot be saved). Benchmark use only: the weights and memory mean nothing.

    Memory at the released geometry (RELEASED_MPLUS, 153,600 LTM tokens, bf16; GB = 1e9 bytes):
      construction peak on the device: the drawn checkpoint tensors 16.6 (projections, adapters,
        selectors, embeddings, lm_head) + their merged copies 14.7 + lm_head transposed 1.05 +
        STM 2.7 (drawn) + 2.7 (slotted copy) + STM K/V 1.3 ≈ 39 GB, then the originals of the
        adapted projections go to host memory (13.0 GB, kept only for saving) and the drawn
        tensors are released. So drawing on the device fits an 80 GB H100; no host draw needed.
      resident on the device: weights 16.7 (merged QKV, O, gate|up, down 14.0 (K|V and the
        original o_proj are views of these) + rank-16 encoder corrections 0.17, embeddings 1.05,
        lm_head 1.05, selectors 0.43) + STM 4.0 (hidden 2.7, K/V 1.3) + LTM retrieval keys 2.5 + ages/frequencies/
        provenance 0.12, and LTM K/V 20.1 with ltm_placement="device" (pinned host memory with "host").
      per prompt: rotated [bos | STM] keys/values 1.3 (cached), decode cache of a 512-token
        prompt + 32 new tokens 1.75.
      Device total ≈ 43 GB resident, ≈ 46 GB at generation with the bank on the device; ≈ 23 and
      ≈ 26 GB with it on the host (host: 20.1 GB pinned bank + 13.0 GB originals)."""
    _check_random_model_args(config, ltm_tokens, ltm_placement, backend, weight_std)
    device = resolve_device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    model = MPlus(config, _random_state(config, g, weight_std, device=device, dtype=dtype), device=device,
                  dtype=dtype, backend=backend, seed=seed, ltm_placement=ltm_placement)
    if ltm_tokens:
        model.backend.add_synthetic_ltm(ltm_tokens, g, chunk_rows=chunk_rows)
    return model


def _check_random_model_args(config, ltm_tokens, ltm_placement, backend, weight_std) -> None:
    """Fail before anything large is drawn."""
    if not isinstance(config, MPlusConfig):
        raise TypeError(f"random_model: config must be an MPlusConfig, got {type(config).__name__}")
    if isinstance(ltm_tokens, bool) or not isinstance(ltm_tokens, int) or ltm_tokens < 0:
        raise ValueError(f"random_model: ltm_tokens={ltm_tokens!r} must be a non-negative integer (rows per layer)")
    if ltm_placement not in LTM_PLACEMENTS:
        raise ValueError(f"random_model: ltm_placement={ltm_placement!r} is not one of {list(LTM_PLACEMENTS)}")
    if backend != "fast":
        raise ValueError(f"random_model: backend={backend!r} is not supported: the synthetic LTM bank is the fast "
                         "backend's K/V layout (the reference keeps the LTM as hidden states); use backend='fast'")
    if ltm_tokens and not config.is_mplus:
        raise ValueError(f"random_model: ltm_tokens={ltm_tokens} but a MemoryLLM model has no long-term memory")
    if not weight_std > 0:
        raise ValueError(f"random_model: weight_std={weight_std!r} must be positive")


def _random_state(config: MPlusConfig, g: torch.Generator, weight_std: float, **factory) -> dict[str, torch.Tensor]:
    """Weights and STM drawn where `factory` says, with an empty LTM (filled afterwards)."""
    t = {name: random_weight(name, shape, g, weight_std, **factory) for name, shape in expected_weight_shapes(config).items()}
    L, d = config.num_hidden_layers, config.hidden_size
    t["memory"] = torch.randn(L, config.stm_size, d, generator=g, **factory)
    if not config.is_mplus:
        t["initialized"] = torch.tensor(1, dtype=torch.uint8)
        return t
    for i in range(L):
        t[f"ltm.{i}"] = torch.zeros(0, d, **factory)
        t[f"ltm_keys.{i}"] = torch.zeros(0, config.selector_hidden_dim, **factory)
        t[f"ltm_ages.{i}"] = torch.zeros(0, device=factory["device"])
        t[f"ltm_recall_frequencies.{i}"] = torch.zeros(0, device=factory["device"])
    return t


def memory_state(stm: torch.Tensor, stm_ages: torch.Tensor, ltm_layers) -> "MemoryState":
    """A reference-layout memory from given parts: `ltm_layers` = per layer (rows, keys, ages,
    recall frequencies); every row of unknown provenance (-1) and the pending buffers empty.
    (Tests of the update and the store build their states with it, each drawing its own values.)"""
    from mplus_fast.memory import MemoryState
    L, N, d = stm.shape
    st = MemoryState(stm=stm, stm_ages=stm_ages, stm_prov=torch.full((L, N), -1))
    for rows, keys, ages, rf in ltm_layers:
        st.ltm.append(rows)
        st.ltm_keys.append(keys)
        st.ltm_ages.append(ages)
        st.ltm_rf.append(rf)
        st.ltm_prov.append(torch.full((rows.shape[0],), -1))
        st.pend.append(torch.zeros(0, d))
        st.pend_keys.append(torch.zeros(0, keys.shape[1]))
        st.pend_ages.append(torch.zeros(0, dtype=torch.int64))
        st.pend_prov.append(torch.zeros(0, dtype=torch.int64))
    return st

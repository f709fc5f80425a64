"""Model configuration, read from an upstream `config.json` (Hugging Face Llama fields + M+ fields).

One dataclass for both architectures: `MPlus` (STM + LTM + retriever) and `MemoryLLM` (memory only).
Field names are the upstream ones, so `MPlusConfig.from_dict(json.load(...))` round-trips.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHITECTURES = ("MPlus", "MemoryLLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")


class ConfigError(ValueError):
    """An unsupported or inconsistent value in config.json (the message names the field)."""


@dataclass
class MPlusConfig:
    # Llama backbone
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    pretraining_tp: int = 1
    # Memory (MemoryLLM and M+)
    architectures: list[str] = field(default_factory=lambda: ["MPlus"])
    num_tokens: int = 256
    num_blocks: int = 50
    add_bos_embedding: bool = True
    add_decoder_lora: bool = True
    lora_config: dict | None = None
    # M+ long-term memory and retriever
    num_ltm_blocks: int = 0
    update_ltm_mode: str = "immediate"
    update_ltm_frequency: int = 60
    decay_frequency: float = 1.0
    initial_rf_when_moving_stm_to_ltm: float = 10.0
    ltm_initial_size: int = 0
    selector_hidden_dim: int = 256
    num_selector_layers: int = 2
    add_selector: bool = True
    add_encoder_retriever: bool = True
    map_from_hidden_states: bool = True
    # Everything else from config.json, kept verbatim so save_pretrained writes it back.
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MPlusConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in kwargs:
                raise ConfigError(f"config.json: required field {required!r} is missing")
        cfg = cls(**kwargs, extra=extra)
        if cfg.architecture == "MemoryLLM":
            cfg.num_ltm_blocks = 0
            cfg.add_selector = False
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "MPlusConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out.setdefault("model_type", "llama")
        return out

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config.json: {name}={getattr(self, name, None)!r} {why}")

        if not isinstance(self.architectures, list) or len(self.architectures) != 1 or self.architectures[0] not in ARCHITECTURES:
            raise bad("architectures", f"is not supported (expected one of {list(ARCHITECTURES)})")
        model_type = self.extra.get("model_type", "llama")
        own_type = {"MPlus": "mplus", "MemoryLLM": "memoryllm"}[self.architecture]   # mplus_fast.hf.auto.mark_for_auto
        if model_type not in ("llama", own_type):
            raise ConfigError(f"config.json: model_type={model_type!r} is not supported (expected 'llama' or {own_type!r})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_tokens", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise bad("hidden_size", f"is not divisible by num_attention_heads={self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise bad("head_dim", "must be even (RoPE rotates pairs)")
        if self.hidden_act not in ACTIVATIONS:
            raise bad("hidden_act", f"is not supported (expected one of {list(ACTIVATIONS)})")
        if self.pretraining_tp != 1:
            raise bad("pretraining_tp", "is not supported (only 1; it only changes the summation order upstream)")
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("config.json: attention_bias / mlp_bias = true is not supported (M+ checkpoints have no biases)")
        if not self.add_bos_embedding:
            raise bad("add_bos_embedding", "must be true (all released M+ / MemoryLLM checkpoints use the learned BOS)")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.json: rope_scaling type {rope_type!r} is not supported (expected one of {list(ROPE_TYPES)})")
        if rope_type != "default" and "factor" not in (self.rope_scaling or {}):
            raise ConfigError(f"config.json: rope_scaling of type {rope_type!r} needs a 'factor'")
        if self.lora_config is not None:
            for key in ("r", "lora_alpha"):
                if key not in self.lora_config:
                    raise ConfigError(f"config.json: lora_config.{key} is missing")
            if self.lora_config["r"] <= 0:
                raise ConfigError(f"config.json: lora_config.r={self.lora_config['r']!r} must be positive")
        if self.is_mplus:
            if not (0 < self.num_ltm_blocks < self.num_blocks):
                raise bad("num_ltm_blocks", f"must be in 1..num_blocks-1 (num_blocks={self.num_blocks}) for M+")
            if self.update_ltm_mode != "immediate":
                raise bad("update_ltm_mode", "is not supported (only 'immediate', as released)")
            if self.num_selector_layers not in (1, 2):
                raise bad("num_selector_layers", "must be 1 or 2")
            if not self.add_selector:
                raise bad("add_selector", "must be true for M+ (retrieval needs the selector)")
            if self.selector_hidden_dim <= 0:
                raise bad("selector_hidden_dim", "must be positive")
            if self.update_ltm_frequency <= 0:
                raise bad("update_ltm_frequency", "must be positive")

    # ---------------------------------------------------------------- derived sizes
    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def is_mplus(self) -> bool:
        return self.architecture == "MPlus"

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def stm_size(self) -> int:
        """N: short-term memory tokens per layer."""
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def ltm_retrieved(self) -> int:
        """R: long-term memory tokens retrieved per layer per prompt (0 for MemoryLLM)."""
        return self.num_ltm_blocks * self.num_tokens

    @property
    def read_prefix_len(self) -> int:
        """P: bos + retrieved LTM + STM, the memory prefix of every prompt."""
        return 1 + self.ltm_retrieved + self.stm_size

    @property
    def lora_scale(self) -> float:
        if not self.lora_config:
            return 0.0
        return float(self.lora_config["lora_alpha"]) / float(self.lora_config["r"])

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def max_ltm_tokens(self) -> int:
        """Upper bound of the LTM bank per layer: a token survives initial_rf merges."""
        return int(self.initial_rf_when_moving_stm_to_ltm * self.update_ltm_frequency * self.num_tokens)

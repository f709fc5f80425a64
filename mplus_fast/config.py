"""Model configuration, read from an upstream `config.json` (Hugging Face Llama fields + M+ fields).

One dataclass for both architectures: `MPlus` (STM + LTM + retriever) and `MemoryLLM` (memory only).
Field names are the upstream ones, so `MPlusConfig.from_dict(json.load(...))` round-trips.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHITECTURES = ("MPlus", "MemoryLLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # SPEC §1: not o_proj
MAX_CONFIG_BYTES = 16 * 2**20      # real config.json files are a few kB

# Sizes beyond any released Llama (126 layers, hidden 16,384, vocab 256k, 128k context) by a wide
# margin: a value past them comes from a corrupted or hostile file, refused before anything is built.
INT_FIELDS = {  # name: (lowest, highest)
    "vocab_size": (1, 2**24), "hidden_size": (1, 2**17), "intermediate_size": (1, 2**19),
    "num_hidden_layers": (1, 2**10), "num_attention_heads": (1, 2**10), "num_key_value_heads": (1, 2**10),
    "head_dim": (1, 2**12), "max_position_embeddings": (1, 2**26), "pretraining_tp": (1, 2**10),
    "num_tokens": (1, 2**16), "num_blocks": (1, 2**16), "num_ltm_blocks": (0, 2**16),
    "update_ltm_frequency": (1, 2**20), "ltm_initial_size": (0, 2**31), "selector_hidden_dim": (1, 2**16),
    "num_selector_layers": (1, 2),
}
OPTIONAL_INTS = ("num_key_value_heads", "head_dim")
FLOAT_FIELDS = {  # name: (lowest, highest, lowest excluded)
    "rms_norm_eps": (0.0, 1.0, True), "rope_theta": (0.0, 1e12, True),
    "decay_frequency": (0.0, 1e6, True), "initial_rf_when_moving_stm_to_ltm": (0.0, 1e6, True),
}
BOOL_FIELDS = ("attention_bias", "mlp_bias", "tie_word_embeddings", "add_bos_embedding", "add_decoder_lora",
               "add_selector", "add_encoder_retriever", "map_from_hidden_states")
MAX_STM_TOKENS = 2**22
MAX_LORA_RANK = 2**12
# Required even though the dataclass has defaults: they fix the memory's geometry, and a default
# silently used would surface later as "tensor 'memory' has shape ..., expected ...".
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "architectures", "num_tokens", "num_blocks")
REQUIRED_MPLUS = ("num_ltm_blocks", "selector_hidden_dim", "num_selector_layers")
# Other fields that change which tensors a checkpoint holds, or their shapes.
SHAPE_FIELDS = ("num_key_value_heads", "head_dim", "tie_word_embeddings", "lora_config", "add_decoder_lora",
                "add_encoder_retriever")


class ConfigError(ValueError):
    """An unsupported or inconsistent value in config.json (the message names the field)."""


def _bad(cfg, name: str, why: str) -> ConfigError:
    return ConfigError(f"config.json: {name}={getattr(cfg, name, None)!r} {why}")


def _check_int(cfg, name: str, lo: int, hi: int, optional: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(cfg, name, "must be an integer" + (" or null" if optional else ""))
    if not lo <= value <= hi:
        raise _bad(cfg, name, f"is out of range ({lo:,} … {hi:,})")


def _check_number(value, name: str, lo: float, hi: float, open_lo: bool) -> float:
    """A JSON number (int or float, not bool) in [lo, hi] (or (lo, hi]); returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {name}={value!r} must be a number")
    if not (lo < value <= hi if open_lo else lo <= value <= hi):  # False for NaN
        raise ConfigError(f"config.json: {name}={value!r} is out of range ({'>' if open_lo else '>='} {lo:g}, <= {hi:g})")
    return value


def _check_float(cfg, name: str, lo: float, hi: float, open_lo: bool) -> None:
    _check_number(getattr(cfg, name), name, lo, hi, open_lo)


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_token_id_field(name: str, value, vocab_size: int, where: str = "config.json") -> None:
    """A bos/eos/pad field: null or a token id of the vocabulary (eos: also a list of them)."""
    if value is None:
        return
    many = name == "eos_token_id" and isinstance(value, list)
    ids = value if many else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise ConfigError(f"{where}: {name}={value!r} must be null or a token id in [0, vocab_size={vocab_size})"
                          + (" (or a list of them)" if name == "eos_token_id" else ""))


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
    # The fields config.json did not set (their defaults are in use); not written back.
    defaulted: frozenset = field(default=frozenset(), repr=False, compare=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MPlusConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, not {type(raw).__name__}")
        known = {f.name for f in fields(cls)} - {"extra", "defaulted"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        arch = kwargs.get("architectures")
        mplus = not (isinstance(arch, list) and arch == ["MemoryLLM"])
        for required in REQUIRED + (REQUIRED_MPLUS if mplus else ()):
            if required not in kwargs:
                raise ConfigError(f"config.json: required field {required!r} is missing")
        cfg = cls(**kwargs, extra=extra, defaulted=frozenset(known - set(kwargs)))
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
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is not a config.json (at most {MAX_CONFIG_BYTES:,} bytes are read)")
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:  # name the file, not just "config.json"
            msg = str(exc)
            raise ConfigError(f"{path}: {msg.removeprefix('config.json: ')}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "defaulted")}
        out.update(self.extra)
        out.setdefault("model_type", "llama")
        return out

    def defaulted_shape_fields(self) -> list[str]:
        """Fields that fix tensor shapes but were not in config.json (their defaults were used):
        named by checkpoint errors, since a wrong default shows up as a tensor of the wrong shape."""
        return sorted(self.defaulted & set(SHAPE_FIELDS))

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Every field's type and range, then the relations between fields. Each error names the
        field (ConfigError). Bounds far beyond any released Llama keep a corrupted or hostile
        config.json from asking for absurd sizes: it is refused here, before anything is built."""
        for name, (lo, hi) in INT_FIELDS.items():
            _check_int(self, name, lo, hi, optional=name in OPTIONAL_INTS)
        for name, (lo, hi, open_lo) in FLOAT_FIELDS.items():
            _check_float(self, name, lo, hi, open_lo)
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _bad(self, name, "must be true or false")
        if not isinstance(self.architectures, list) or len(self.architectures) != 1 or self.architectures[0] not in ARCHITECTURES:
            raise _bad(self, "architectures", f"is not supported (expected one of {[[a] for a in ARCHITECTURES]})")
        model_type = self.extra.get("model_type", "llama")
        own_type = {"MPlus": "mplus", "MemoryLLM": "memoryllm"}[self.architecture]   # mplus_fast.hf.auto.mark_for_auto
        if model_type not in ("llama", own_type):
            raise ConfigError(f"config.json: model_type={model_type!r} is not supported (expected 'llama' or {own_type!r})")
        for name, allowed in (("hidden_act", ACTIVATIONS), ("update_ltm_mode", ("immediate",))):
            if getattr(self, name) not in allowed:
                raise _bad(self, name, f"is not supported (expected one of {list(allowed)})")
        self._validate_token_ids()
        self._validate_attention()
        if self.pretraining_tp != 1:
            raise _bad(self, "pretraining_tp", "is not supported (only 1; it only changes the summation order upstream)")
        if self.attention_bias or self.mlp_bias:
            raise ConfigError("config.json: attention_bias / mlp_bias = true is not supported (M+ checkpoints have no biases)")
        if not self.add_bos_embedding:
            raise _bad(self, "add_bos_embedding", "must be true (all released M+ / MemoryLLM checkpoints use the learned BOS)")
        self._validate_rope()
        self._validate_lora()
        if self.is_mplus:
            if not (0 < self.num_ltm_blocks < self.num_blocks):
                raise _bad(self, "num_ltm_blocks", f"must be in 1..num_blocks-1 (num_blocks={self.num_blocks}) for M+")
            if self.num_selector_layers not in (1, 2):
                raise _bad(self, "num_selector_layers", "must be 1 or 2")
            if not self.add_selector:
                raise _bad(self, "add_selector", "must be true for M+ (retrieval needs the selector)")
        if self.stm_size > MAX_STM_TOKENS:
            raise ConfigError(f"config.json: (num_blocks - num_ltm_blocks) x num_tokens = {self.stm_size:,} short-term "
                              f"memory tokens per layer is out of range (at most {MAX_STM_TOKENS:,})")
        self._validate_positions()

    def _validate_token_ids(self) -> None:
        for name in TOKEN_ID_FIELDS:
            check_token_id_field(name, getattr(self, name), self.vocab_size)

    def _validate_attention(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise _bad(self, "num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise _bad(self, "hidden_size", f"is not divisible by num_attention_heads={self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise _bad(self, "head_dim", "must be even (RoPE rotates pairs)")

    def _validate_rope(self) -> None:
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise _bad(self, "rope_scaling", "must be null or an object")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.json: rope_scaling type {rope_type!r} is not supported (expected one of {list(ROPE_TYPES)})")
        if rope_type == "default":
            return
        if "factor" not in self.rope_scaling:
            raise ConfigError(f"config.json: rope_scaling of type {rope_type!r} needs a 'factor'")
        _check_number(self.rope_scaling.get("factor"), "rope_scaling.factor", 1.0, 1e6, open_lo=False)
        if rope_type == "llama3":
            low = _check_number(self.rope_scaling.get("low_freq_factor", 1.0), "rope_scaling.low_freq_factor", 0, 1e6, True)
            high = _check_number(self.rope_scaling.get("high_freq_factor", 4.0), "rope_scaling.high_freq_factor", 0, 1e6, True)
            if not high > low:
                raise ConfigError(f"config.json: rope_scaling.high_freq_factor={high!r} must be greater than "
                                  f"low_freq_factor={low!r}")
            old = self.rope_scaling.get("original_max_position_embeddings", 8192)
            if isinstance(old, bool) or not isinstance(old, int) or not 1 <= old <= INT_FIELDS["max_position_embeddings"][1]:
                raise ConfigError(f"config.json: rope_scaling.original_max_position_embeddings={old!r} must be a positive integer")

    def _validate_lora(self) -> None:
        lora = self.lora_config
        if lora is None:
            return
        if not isinstance(lora, dict):
            raise _bad(self, "lora_config", "must be null or an object")
        for key in ("r", "lora_alpha"):
            if key not in lora:
                raise ConfigError(f"config.json: lora_config.{key} is missing")
        r = lora["r"]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_LORA_RANK:
            raise ConfigError(f"config.json: lora_config.r={r!r} must be an integer in 1..{MAX_LORA_RANK}")
        _check_number(lora["lora_alpha"], "lora_config.lora_alpha", -1e6, 1e6, open_lo=False)
        targets = lora.get("target_modules")
        if targets is not None:
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ConfigError(f"config.json: lora_config.target_modules={targets!r} must be a list of module names")
            unknown = sorted(set(targets) - set(LORA_MODULES))
            if unknown:
                raise ConfigError(f"config.json: lora_config.target_modules names {unknown}, which M+ does not adapt "
                                  f"(supported: {list(LORA_MODULES)})")

    def _validate_positions(self) -> None:
        """Without dynamic RoPE, positions past the trained range are meaningless: the memory
        prefix of a read (1 + R + N) and of an injection (1 + T) must leave room for input."""
        limit = self.max_positions
        if limit is None:
            return
        need = max(self.read_prefix_len, 1 + self.num_tokens) + 1
        if need > limit:
            raise ConfigError(f"config.json: max_position_embeddings={self.max_position_embeddings} leaves no position "
                              f"for input after the memory prefix (a read uses positions 0..{self.read_prefix_len - 1} "
                              f"for bos, {self.ltm_retrieved} LTM and {self.stm_size} STM tokens)")

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
        """Upper bound of the LTM bank per layer (rows loaded with the checkpoint aside): a merged
        token starts at initial_rf, loses decay_frequency per merge and goes once at or under 0.01,
        so it lives ceil((initial_rf - 0.01) / decay) merges of update_ltm_frequency × T tokens."""
        lives = max(1, math.ceil((self.initial_rf_when_moving_stm_to_ltm - 0.01) / self.decay_frequency))
        return lives * self.update_ltm_frequency * self.num_tokens

    @property
    def max_positions(self) -> int | None:
        """How many positions inputs may use (None: no limit, dynamic RoPE rescales past it).
        Linear scaling stretches the positions by its factor, so its limit is
        max_position_embeddings × factor (configs that give the original length still work)."""
        if self.rope_type == "dynamic":
            return None
        if self.rope_type == "linear":
            return int(self.max_position_embeddings * float(self.rope_scaling["factor"]))
        return self.max_position_embeddings

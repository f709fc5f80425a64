"""Generation options the Hugging Face way: `generation_config.json` defaults, a
`GenerationConfig` (or a plain dict), then keyword arguments, each overriding the one before.

- The model's defaults are its checkpoint's generation_config.json (`model.generation_config`).
- A transformers `GenerationConfig` brings transformers' defaults (e.g. top_k=50 when sampling),
  then the model's defaults replace the values the config left at transformers' defaults, then
  the values it changed win (Hugging Face's `use_model_defaults`); a dict contributes every key
  it has.
- Keyword arguments that are not None win.
Supported: max_new_tokens (or max_length = prompt + new), do_sample, temperature, top_k, top_p,
eos_token_id, pad_token_id, stop_strings. Settings that would change the result and that we do
not implement (beam search, repetition penalty, ...) are refused with their name; bookkeeping
keys (bos_token_id, transformers_version, use_cache, ...) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 20
# transformers' library defaults, under a GenerationConfig's unset (None) values.
HF_LIBRARY_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}   # Hugging Face's default max_length (20), counted as new tokens

SUPPORTED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
             "pad_token_id", "stop_strings")
IGNORED = {"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "use_cache",
           "output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
           "cache_implementation", "_commit_hash", "generation_kwargs", "min_p_", "watermarking_config"}
# Values that leave the result unchanged, so a config holding them is fine.
NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
           "length_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "min_length": 0,
           "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
           "encoder_repetition_penalty": 1.0, "early_stopping": False, "penalty_alpha": None, "min_p": None,
           "bad_words_ids": None, "force_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
           "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "constraints": None,
           "guidance_scale": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
           "remove_invalid_values": False, "low_memory": None, "token_healing": False, "prompt_lookup_num_tokens": None,
           "max_time": None, "stop_strings": None, "assistant_model": None}


@dataclass
class GenOptions:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    stop_strings: list[str]


def config_dicts(generation_config) -> tuple[dict, dict]:
    """(every setting, the settings changed from transformers' defaults) of a user's config."""
    if generation_config is None:
        return {}, {}
    if isinstance(generation_config, dict):
        return dict(generation_config), dict(generation_config)
    if hasattr(generation_config, "to_diff_dict"):
        full = {**HF_LIBRARY_DEFAULTS, **{k: v for k, v in generation_config.to_dict().items() if v is not None}}
        return full, {k: v for k, v in generation_config.to_diff_dict().items() if v is not None}
    if hasattr(generation_config, "to_dict"):
        return dict(generation_config.to_dict()), dict(generation_config.to_dict())
    raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict, got "
                    f"{type(generation_config).__name__}")


def check_supported(settings: dict, where: str) -> None:
    for key, value in settings.items():
        if key in SUPPORTED or key in IGNORED:
            continue
        if key in NEUTRAL and value == NEUTRAL[key]:
            continue
        raise ValueError(f"{where}: {key}={value!r} is not supported by mplus_fast (supported: "
                         f"{', '.join(SUPPORTED)})")


def resolve(model_defaults: dict, generation_config, overrides: dict, prompt_len: int) -> GenOptions:
    full, changed = config_dicts(generation_config)
    check_supported(changed, "generation_config")
    check_supported({k: v for k, v in overrides.items() if v is not None}, "generate")
    merged = {k: v for k, v in full.items() if k in SUPPORTED}
    merged.update({k: v for k, v in model_defaults.items() if k in SUPPORTED})
    merged.update({k: v for k, v in changed.items() if k in SUPPORTED})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    merged = {k: v for k, v in merged.items() if v is not None}
    new = merged.get("max_new_tokens")
    if new is None and merged.get("max_length") is not None:
        new = max(int(merged["max_length"]) - prompt_len, 0)
    stop = merged.get("stop_strings") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop_strings={stop!r} must be a non-empty string or a list of them")
    do_sample = merged.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample={do_sample!r} must be True or False")
    return GenOptions(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if new is None else new,
        do_sample=do_sample,
        temperature=float(merged.get("temperature", 1.0)) if merged.get("temperature") is not None else 1.0,
        top_k=merged.get("top_k"),
        top_p=merged.get("top_p"),
        eos_token_id=merged.get("eos_token_id"),
        pad_token_id=merged.get("pad_token_id"),
        stop_strings=list(stop),
    )

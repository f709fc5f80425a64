"""transformers' Auto classes for M+ and MemoryLLM (needs `transformers`: pip install 'mplus_fast[hf]').

    import mplus_fast.hf.auto                        # registers the model types "mplus" and "memoryllm"
    model = AutoModelForCausalLM.from_pretrained(path)   # our model behind the transformers interface

transformers picks a class from config.json's `model_type`. The released checkpoints say "llama"
(their layout is a Llama's plus memory tensors), which transformers would load as a plain
`LlamaForCausalLM`, silently dropping the memory; so a checkpoint is marked once with
`mark_for_auto(path)` (model_type "mplus" or "memoryllm" by its architecture; nothing else
changes, and mplus_fast and the authors' code still load it). `MPlusForCausalLM.from_pretrained`
accepts either model_type.

The wrapper runs `mplus_fast.MPlus` (same outputs: `forward` returns its float32 logits in a
`CausalLMOutputWithPast`, `generate` is `MPlus.generate` with GenerationConfig, streamers and stop
strings); the memory methods (`inject_memory`, `snapshot`, `save_memory`, ...) pass through.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

try:
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(f"mplus_fast.hf.auto needs transformers ({exc}): pip install 'mplus_fast[hf]'") from None

MODEL_TYPES = {"MPlus": "mplus", "MemoryLLM": "memoryllm"}


class MPlusHFConfig(PretrainedConfig):
    model_type = "mplus"


class MemoryLLMHFConfig(PretrainedConfig):
    model_type = "memoryllm"


class MPlusForCausalLM(PreTrainedModel):
    config_class = MPlusHFConfig
    base_model_prefix = "mplus"
    _no_split_modules: list = []

    def __init__(self, config, mplus=None):
        super().__init__(config)
        self.mplus = mplus

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, device="cpu", dtype=None,
                        torch_dtype=None, backend: str = "fast", seed: int | None = None, **kwargs):
        import mplus_fast
        dtype = dtype or torch_dtype
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        model = mplus_fast.load(pretrained_model_name_or_path, device=device, dtype=dtype, backend=backend, seed=seed)
        raw = model.config.to_dict()
        raw["model_type"] = MODEL_TYPES[model.config.architecture]
        cfg_cls, model_cls = ((MPlusHFConfig, MPlusForCausalLM) if model.config.is_mplus
                              else (MemoryLLMHFConfig, MemoryLLMForCausalLM))
        hf_config = cfg_cls(**{k: v for k, v in raw.items() if k != "model_type"})
        return model_cls(hf_config, model)

    @property
    def device(self) -> torch.device:
        return self.mplus.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mplus.dtype

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        unused = {k for k, v in kwargs.items() if v is not None and k not in ("return_dict", "use_cache")}
        if unused:
            raise ValueError(f"MPlusForCausalLM.forward: {sorted(unused)} are not supported")
        return CausalLMOutputWithPast(logits=self.mplus(input_ids, attention_mask).logits)

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        return self.mplus.generate(input_ids, attention_mask, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inject_memory", "snapshot", "restore", "reset", "save_memory", "load_memory", "memory_stats",
                        "complete", "chat", "inject_text", "tokenizer", "state"):
                return getattr(self._modules.get("mplus") or self.__dict__["mplus"], name)
            raise


class MemoryLLMForCausalLM(MPlusForCausalLM):
    config_class = MemoryLLMHFConfig


def mark_for_auto(path) -> Path:
    """Set config.json's model_type to "mplus" / "memoryllm" so transformers' Auto classes pick ours."""
    from mplus_fast.atomic import commit_files
    from mplus_fast.config import MPlusConfig
    cfg_path = Path(path) / "config.json"
    raw = json.loads(cfg_path.read_text())
    arch = MPlusConfig.from_dict(dict(raw, model_type="llama")).architecture
    raw["model_type"] = MODEL_TYPES[arch]
    text = json.dumps(raw, indent=2, sort_keys=True) + "\n"
    commit_files(Path(path), {"config.json": lambda p: p.write_text(text)})
    return cfg_path


def register() -> None:
    for cfg_cls, model_cls in ((MPlusHFConfig, MPlusForCausalLM), (MemoryLLMHFConfig, MemoryLLMForCausalLM)):
        try:
            AutoConfig.register(cfg_cls.model_type, cfg_cls)
        except ValueError as exc:   # already registered (e.g. a module reload)
            if "already used" not in str(exc):
                raise
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)


register()

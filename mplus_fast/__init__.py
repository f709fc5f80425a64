"""mplus_fast: fast, faithful inference for M+ and MemoryLLM.

    import mplus_fast
    model = mplus_fast.load("path/to/checkpoint")          # upstream Hugging Face layout
    model.inject_memory(context_ids, update_memory=True)     # write into the memory
    out = model(input_ids)                                   # .logits, .ltm_indices, .ltm_provenance
    ids = model.generate(input_ids, max_new_tokens=32)
    model.save_pretrained("path/to/out")                     # memory included, reload continues exactly
"""
from __future__ import annotations

from mplus_fast.checkpoint import CheckpointError
from mplus_fast.config import ConfigError, MPlusConfig
from mplus_fast.model import MPlus, MPlusOutput

__version__ = "0.1.0"


def load(path, *, device="cpu", dtype=None, backend: str = "fast", seed: int | None = None,
         age_mode: str = "inference", ltm_placement: str | None = None, tokenizer="auto",
         preset: str | None = None) -> MPlus:
    """Load an M+ or MemoryLLM checkpoint (upstream layout, single-file or sharded safetensors).

    device: where weights and memory live ("cpu", "cuda", ...). dtype: compute dtype (default
    float32 on CPU, bfloat16 on CUDA). backend: "fast" (memory as cached keys/values, the default)
    or "reference" (the authors' computation in plain PyTorch, the parity truth).
    seed: seeds the model's generator (memory drops, sampling). age_mode: "inference" (reference
    parity) or "training" (ages the STM before each drop, as the reference's training code does).
    ltm_placement (fast backend): "device" keeps the LTM bank's keys/values on `device`; "host" keeps
    them in CPU memory (pinned when `device` is a GPU) and prefetches the retrieved rows per layer,
    overlapped with the attention over [bos | STM | prompt] (None: "device", unless a preset says otherwise).
    preset: named options, "low-memory" (for 24 GB GPUs: ltm_placement="host", bfloat16; its
    computed budget is in docs/memory_budget.md); an explicit option contradicting it is refused.
    The checkpoint is streamed: each tensor is converted to its dtype and place as it is read
    (`mplus_fast.loading`), so loading needs about what the model keeps plus one tensor.
    tokenizer: "auto" loads the folder's tokenizer.json (when the `tokenizers` package is installed)
    as `model.tokenizer`, for `model.complete` / `model.chat` / `model.inject_text`; None: none.
    path may also be a Hugging Face hub id ("org/name"): it is resolved from the local hub cache,
    or downloaded when `huggingface_hub` is installed and the machine is online (`mplus_fast.hf.hub`).
    """
    from mplus_fast.hf.hub import resolve_checkpoint
    return MPlus.from_pretrained(resolve_checkpoint(path), device=device, dtype=dtype, backend=backend, seed=seed,
                                 age_mode=age_mode, ltm_placement=ltm_placement, tokenizer=tokenizer, preset=preset)


__all__ = ["load", "MPlus", "MPlusOutput", "MPlusConfig", "ConfigError", "CheckpointError", "__version__"]

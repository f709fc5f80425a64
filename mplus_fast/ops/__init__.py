"""The mplus_fast op table: one line per op. Each op has a pure-PyTorch reference in its module.

| op (torch.ops.mplus_fast.*) | module | what it does |
| --- | --- | --- |
(ops are added by the native op library work; see docs/adding_an_op.md)
| `rope_apply` | `mplus_fast.ops.rope` | HF-Llama RoPE at arbitrary per-row positions (any variant via inv_freq) |
| `memory_attention` | `mplus_fast.ops.attention` | queries over [prefix rows (gathered, RoPE on load), causal tail], GQA, returns out + lse |
| `merge_attention_states` | `mplus_fast.ops.attention` | exact log-sum-exp merge of two partial attentions |
"""
from mplus_fast.ops._library import build_info, load_extension

load_extension()

from mplus_fast.ops import rope  # noqa: E402,F401  (op 5)
from mplus_fast.ops import attention  # noqa: E402,F401  (op 4)

__all__ = ["build_info", "load_extension"]

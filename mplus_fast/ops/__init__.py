"""The mplus_fast op table: one line per op. Each op has a pure-PyTorch reference in its module.

| op (torch.ops.mplus_fast.*) | module | what it does |
| --- | --- | --- |
| gather_rows / gather_rows_out | gather | out = bank[index] for rows of a (pinned, CPU or GPU) bank; CPU threads, CUDA + zero-copy kernel |
| retrieval_topk | retrieval | top-k LTM keys by mean over queries of sigmoid(q·key), [keys; pending] |
| topk_ascending | topk | the k largest scores per row (ties: lower index) in index order, by selection (no sort) |
| stm_update_ | insertion | STM update in O(T·d): new rows into dropped slots, logical order updated in place (the engine's store does its own slot assignment, mplus_fast/store.py) |
| rope_apply | rope | HF-Llama RoPE at arbitrary per-row positions (any variant via inv_freq) |
| memory_attention | attention | queries over [prefix rows (gathered, RoPE on load), causal tail], GQA, returns out + lse |
| merge_attention_states | attention | exact log-sum-exp merge of two partial attentions |
| decode_gemv | decode | x @ w for the few rows of a decode step, each weight read once (CPU) |
| decode_attention | decode | one query token over the static decode cache with a validity mask (and an optional batch-shared prefix, read once for the batch), GQA (CPU) |
"""
from mplus_fast.ops._library import build_info, has_native_kernel, load_extension

load_extension()

from mplus_fast.ops import gather  # noqa: E402,F401  (gather_rows, gather_rows_out)
from mplus_fast.ops import topk  # noqa: E402,F401  topk_ascending
from mplus_fast.ops import retrieval  # noqa: E402,F401  retrieval_topk
from mplus_fast.ops import insertion  # noqa: E402,F401  stm_update_
from mplus_fast.ops import rope  # noqa: E402,F401  (op 5)
from mplus_fast.ops import attention  # noqa: E402,F401  (op 4)
from mplus_fast.ops import decode  # noqa: E402,F401  decode_gemv, decode_attention

__all__ = ["build_info", "has_native_kernel", "load_extension"]

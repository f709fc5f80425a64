"""The mplus_fast op table: one line per op. Each op has a pure-PyTorch reference in its module.

| op (torch.ops.mplus_fast.*) | module | what it does |
| --- | --- | --- |
| retrieval_topk | retrieval | top-k LTM keys by mean over queries of sigmoid(q·key), [keys; pending] |
| stm_update_ | insertion | STM update in O(T·d): new rows into dropped slots, logical order updated in place |
| assemble_rows | insertion | [bos / LTM rows by index / STM in logical order / new] + pos-emb, into `out` |
(ops are added by the native op library work; see docs/adding_an_op.md)
"""
from mplus_fast.ops._library import build_info, load_extension

load_extension()

from mplus_fast.ops import retrieval  # noqa: E402,F401  retrieval_topk
from mplus_fast.ops import insertion  # noqa: E402,F401  stm_update_, assemble_rows

__all__ = ["build_info", "load_extension"]

"""The mplus_fast op table: one line per op. Each op has a pure-PyTorch reference in its module.

| op (torch.ops.mplus_fast.*) | module | what it does |
| --- | --- | --- |
| gather_rows / gather_rows_out | ops/gather.py | out = bank[index] for rows of a (pinned, CPU or GPU) bank; CPU threads, CUDA + zero-copy kernel |
(ops are added by the native op library work; see docs/adding_an_op.md)
"""
from mplus_fast.ops._library import build_info, load_extension

load_extension()

from mplus_fast.ops import gather  # noqa: E402,F401  (gather_rows, gather_rows_out)

__all__ = ["build_info", "load_extension"]

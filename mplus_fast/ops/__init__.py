"""The mplus_fast op table: one line per op. Each op has a pure-PyTorch reference in its module.

| op (torch.ops.mplus_fast.*) | module | what it does |
| --- | --- | --- |
(ops are added by the native op library work; see docs/adding_an_op.md)
"""
from mplus_fast.ops._library import build_info, load_extension

load_extension()

__all__ = ["build_info", "load_extension"]

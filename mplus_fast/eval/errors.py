"""Errors of the evaluation wing that a user can fix (shown by the command line as one line)."""
from __future__ import annotations


class MissingExtra(RuntimeError):
    """An optional package a task needs is not installed (the message names it)."""

"""Small helpers shared by the command-line tools (`mplus_fast.cli`, `.demo`, `.quickbench`):
user errors, token-id parsing, tokenizer loading, dtype names, timing and process memory."""
from __future__ import annotations

import functools
import sys
import time
import warnings
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape

from mplus_fast.inputs import DTYPE_NAMES, resolve_device

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class CLIError(Exception):
    """A user error: printed as one red line, exit code 2, no traceback."""


# What a user can cause: bad paths, ids, options, checkpoints and configs (CheckpointError and
# ConfigError are ValueErrors whose messages name the culprit), a full disk or a read-only folder.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", soft_wrap=True)


def user_errors(fn):
    """Turn the errors a user can cause into one red `error:` line and exit 2; warnings (e.g. an
    option that has no effect) become one yellow `warning:` line each."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(2)
    return wrapper


def parse_ids(text: str) -> torch.Tensor:
    """"1,2,3" (commas and/or spaces) → LongTensor (n,)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise CLIError("--ids is empty: give comma-separated token ids, e.g. --ids \"1,2,3\"")
    try:
        return torch.tensor([int(p) for p in parts], dtype=torch.long)
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise CLIError(f"--ids: {bad!r} is not an integer token id (expected e.g. \"1,2,3\")") from None


def parse_dtype(name: str | None) -> torch.dtype | None:
    """--dtype: float32, bfloat16 or float16 (None: the device's default)."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise CLIError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def parse_device(name: str) -> torch.device:
    """--device: auto (the GPU when one is present, where the model then defaults to bfloat16;
    else the CPU), cpu, cuda or cuda:N, checked against this machine before anything is loaded."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return resolve_device(name)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e).replace(f"device={name!r}", f"--device {name}", 1)) from None


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder that holds one."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CLIError("the `tokenizers` package is not installed: pip install tokenizers "
                       "(or pip install 'mplus_fast[tokenizer]'), or pass token ids with --ids") from None
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise CLIError(f"tokenizer not found: {f} (give a tokenizer.json or a folder that holds one)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise CLIError(f"--tokenizer {f}: not a valid tokenizer.json ({e})") from None


def encode(tok, text: str) -> torch.Tensor:
    """Text → ids WITHOUT special tokens: M+ adds its own learned BOS per layer (SPEC §2)."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise CLIError("the text encodes to zero tokens")
    return torch.tensor(ids, dtype=torch.long)


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def set_threads(threads: int) -> None:
    """0 keeps torch's default. Small models run fastest on one thread (less sync overhead)."""
    if threads < 0:
        raise CLIError(f"--threads {threads} must be >= 0")
    if threads:
        torch.set_num_threads(threads)


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (Linux/macOS), None if unknown."""
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except Exception:  # pragma: no cover - Windows
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except Exception:
            return None


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """`with Timer(device) as t: ...` then `t.s` (seconds, device-synchronised)."""
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.s = 0.0

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.s = time.perf_counter() - self._t0

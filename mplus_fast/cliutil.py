"""Small helpers shared by the command-line tools (`mplus_fast.cli`, `.demo`, `.quickbench`):
user errors, token-id parsing, tokenizer loading, dtype names, timing and process memory."""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A user error: printed as one red line, exit code 2, no traceback."""


def user_errors(fn):
    """Turn the errors a user can cause (bad paths, ids, configs) into one red line and exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CLIError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            # CheckpointError and ConfigError are ValueErrors with messages that name the culprit.
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
    if name is None:
        return None
    if name not in DTYPES:
        raise CLIError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
    return Tokenizer.from_file(str(f))


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

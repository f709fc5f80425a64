"""`mplus-fast serve`: every option checked first, then the model loaded, then uvicorn started."""
from __future__ import annotations

import os
from pathlib import Path

from mplus_fast.cliutil import CLIError, console, set_threads


def default_data_dir(fingerprint: str) -> Path:
    base = Path(os.environ.get("MPLUS_FAST_CACHE", Path.home() / ".cache" / "mplus_fast"))
    return base / "serve" / fingerprint


def check_options(*, host, port, api_key, max_queue, max_tokens, max_prompt_tokens, max_body_mb, max_inject_mb,
                  request_timeout, queue_timeout, data_dir, tokenizer, backend, resident_mb=0.0) -> None:
    from mplus_fast.backends import BACKENDS
    if not 0 < port < 65536:
        raise CLIError(f"--port {port} must be in 1..65535")
    if not host:
        raise CLIError("--host is empty")
    if api_key is not None and len(api_key) < 8:
        raise CLIError("--api-key must be at least 8 characters")
    for name, value in (("--max-queue", max_queue), ("--max-tokens", max_tokens), ("--max-prompt-tokens", max_prompt_tokens)):
        if value < 1:
            raise CLIError(f"{name} {value} must be at least 1")
    for name, value in (("--max-body-mb", max_body_mb), ("--max-inject-mb", max_inject_mb),
                        ("--request-timeout", request_timeout), ("--queue-timeout", queue_timeout)):
        if not value > 0:
            raise CLIError(f"{name} {value} must be positive")
    if not resident_mb >= 0:
        raise CLIError(f"--resident-mb {resident_mb} must be 0 or more")
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise CLIError(f"--data-dir {data_dir} exists and is not a folder")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise CLIError(f"--tokenizer not found: {tokenizer}")
    if backend not in BACKENDS:
        raise CLIError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CLIError(f"serving needs FastAPI and uvicorn ({exc.name} is not installed): pip install 'mplus_fast[serve]'") from None


def run_server(*, ckpt, host, port, data_dir, api_key, model_name, tokenizer, max_queue, max_tokens, max_prompt_tokens,
               max_body_mb, max_inject_mb, request_timeout, queue_timeout, seed, device, dtype, backend, threads,
               resident_mb: float = 1024.0) -> None:
    import mplus_fast
    from mplus_fast.hf.hub import resolve_checkpoint
    from mplus_fast.hf.tokenizer import load_tokenizer
    from mplus_fast.memories import config_fingerprint
    from mplus_fast.serve import serve
    from mplus_fast.serve.app import ServerSettings

    set_threads(threads)
    check_options(host=host, port=port, api_key=api_key, max_queue=max_queue, max_tokens=max_tokens,
                  max_prompt_tokens=max_prompt_tokens, max_body_mb=max_body_mb, max_inject_mb=max_inject_mb,
                  request_timeout=request_timeout, queue_timeout=queue_timeout, data_dir=data_dir, tokenizer=tokenizer,
                  backend=backend, resident_mb=resident_mb)
    path = resolve_checkpoint(ckpt)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else "auto"
    model = mplus_fast.load(path, device=device, dtype=dtype, seed=seed, backend=backend, tokenizer=tok)
    if model.tokenizer is None:
        raise CLIError(f"{path} holds no tokenizer.json: give --tokenizer PATH")
    data = data_dir or default_data_dir(config_fingerprint(model.config))
    settings = ServerSettings(model_name=model_name or Path(str(ckpt)).name, data_dir=data, api_key=api_key,
                              max_body_bytes=int(max_body_mb * 2**20), max_inject_bytes=int(max_inject_mb * 2**20),
                              max_tokens_limit=max_tokens, max_prompt_tokens=max_prompt_tokens, max_queue=max_queue,
                              queue_timeout_s=queue_timeout, request_timeout_s=request_timeout,
                              resident_bytes=int(resident_mb * 2**20))
    console.print(f"serving {settings.model_name!r} ({model.config.architecture}, {model.device}, "
                  f"{str(model.dtype).replace('torch.', '')}) on http://{host}:{port}/v1; memories in {data}"
                  + ("; API key required" if api_key else ""))
    serve(model, settings, host=host, port=port)

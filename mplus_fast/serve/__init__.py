"""`mplus-fast serve`: an OpenAI-compatible HTTP server over one model with many persistent memories.

    from mplus_fast.serve import ServerSettings, create_app, serve
    serve(model, ServerSettings(model_name="mplus", data_dir=Path("memories")), host="127.0.0.1", port=8000)

Needs the `serve` extra (FastAPI, uvicorn): pip install 'mplus_fast[serve]'. See docs/serving.md.
"""
from __future__ import annotations

EXTRA = "pip install 'mplus_fast[serve]'"


def _require():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"serving needs FastAPI and uvicorn ({exc.name} is missing): {EXTRA}") from None


def create_app(model, settings):
    _require()
    from mplus_fast.serve.app import create_app as make
    return make(model, settings)


def serve(model, settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted (binds 127.0.0.1 unless told otherwise)."""
    _require()
    import uvicorn
    uvicorn.run(create_app(model, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def __getattr__(name):
    if name == "ServerSettings":
        _require()
        from mplus_fast.serve.app import ServerSettings
        return ServerSettings
    raise AttributeError(name)


__all__ = ["create_app", "serve", "ServerSettings"]

"""The FastAPI app: OpenAI-compatible endpoints over a memory-augmented model, and memories over HTTP.

    GET    /v1/models                       the served model
    POST   /v1/completions                  text (or ids) in, text out; stream, echo, logprobs, stop
    POST   /v1/chat/completions             messages in (chat template), a reply out; stream
    GET    /v1/memories                     every memory, with sizes
    POST   /v1/memories                     create a memory (a copy of the checkpoint's), {"id": optional}
    GET    /v1/memories/{id}                one memory
    POST   /v1/memories/{id}/fork           a copy of it, {"id": optional}
    DELETE /v1/memories/{id}                remove it (not "default")
    POST   /v1/memories/{id}/inject         write text ({"text"} / {"ids"} JSON, or a text/plain body)
    GET    /health                          liveness, queue depth

Every error is an OpenAI error object (`errors.APIError`); a rejected request changes no memory.
See docs/serving.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mplus_fast.serve.engine import Engine, GenRequest
from mplus_fast.serve.errors import APIError, bad_request, not_found, too_large
from mplus_fast.serve.registry import DEFAULT_ID, MemoryRegistry, check_id
from mplus_fast.serve.schemas import ChatRequest, CompletionRequest, InjectRequest, MemoryCreate
from mplus_fast.serve.worker import Deadline, ModelWorker, RequestTimeout
from mplus_fast.text import TextDeltas


@dataclass
class ServerSettings:
    model_name: str
    data_dir: Path
    api_key: str | None = None
    max_body_bytes: int = 1 << 20          # JSON bodies
    max_inject_bytes: int = 32 << 20       # an injection's body
    max_tokens_limit: int = 2048           # max_tokens a request may ask for
    default_max_tokens: int = 16           # OpenAI's default for completions
    max_prompt_tokens: int = 8192
    max_queue: int = 16
    queue_timeout_s: float = 60.0
    request_timeout_s: float = 300.0
    max_memories: int = 256
    resident_bytes: int = 1 << 30          # memories kept in host memory, with their K/V (registry.ResidentMemories)


def create_app(model, settings: ServerSettings) -> FastAPI:
    if model.tokenizer is None:
        raise ValueError("serving needs the model's tokenizer: the checkpoint folder has no tokenizer.json "
                         "(give --tokenizer PATH)")
    registry = MemoryRegistry(model, settings.data_dir, settings.max_memories, settings.resident_bytes)
    engine = Engine(model, registry, model.tokenizer)
    worker = ModelWorker(settings.max_queue, settings.queue_timeout_s)
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown()

    app = FastAPI(title="mplus_fast", version=_version(), docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.settings = engine, worker, settings
    _install_errors(app)
    _install_limits(app, settings)
    _routes(app, engine, worker, registry, settings)
    return app


def _version() -> str:
    from mplus_fast import __version__
    return __version__


# ---------------------------------------------------------------------- errors and limits
def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field (not supported by this server)"
        param = ".".join(loc) or None
        return JSONResponse(bad_request(f"{param}: {msg}" if param else msg, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)


def _install_limits(app: FastAPI, settings: ServerSettings) -> None:
    @app.middleware("http")
    async def limits(request: Request, call_next):
        if settings.api_key is not None and request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), settings.api_key.encode()):
                err = APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                               type="authentication_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        limit = settings.max_inject_bytes if request.url.path.endswith("/inject") else settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse(too_large(f"the request body is {int(length)} bytes; the limit is {limit}").body(),
                                status_code=413)
        return await call_next(request)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read as it arrives, refused once it passes `limit` (chunked uploads too)."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large(f"the request body passed the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def _json_body(request: Request, model_cls, limit: int):
    raw = await _read_body(request, limit)
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise bad_request(f"the body is not valid JSON ({exc})") from None
    from pydantic import ValidationError
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


# ---------------------------------------------------------------------- routes
def _routes(app, engine: Engine, worker: ModelWorker, registry: MemoryRegistry, s: ServerSettings) -> None:
    model = engine.model
    created = int(time.time())

    async def run(fn, *args):
        try:
            return await worker.run(fn, *args)
        except RequestTimeout as exc:
            raise APIError(504, str(exc), type="timeout_error", code="timeout") from None
        except (ValueError, TypeError) as exc:
            if isinstance(exc, APIError):
                raise
            raise bad_request(str(exc)) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": worker.in_flight, "active_memory": registry.active}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": created,
                                            "owned_by": "mplus_fast"}]}

    # ------------------------------------------------------------------ memories
    @app.get("/v1/memories")
    async def list_memories():
        return {"object": "list", "data": [_memory_obj(m) for m in registry.list()]}

    @app.post("/v1/memories")
    async def create_memory(request: Request):
        body = await _json_body(request, MemoryCreate, s.max_body_bytes)
        return _memory_obj(await run(registry.create, body.id))

    @app.get("/v1/memories/{memory_id}")
    async def get_memory(memory_id: str):
        return _memory_obj(registry.get(memory_id))

    @app.post("/v1/memories/{memory_id}/fork")
    async def fork_memory(memory_id: str, request: Request):
        body = await _json_body(request, MemoryCreate, s.max_body_bytes)
        return _memory_obj(await run(registry.fork, check_id(memory_id), body.id))

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(memory_id: str):
        meta = await run(registry.delete, check_id(memory_id))
        return {"id": meta["id"], "object": "memory", "deleted": True}

    @app.post("/v1/memories/{memory_id}/inject")
    async def inject(memory_id: str, request: Request):
        check_id(memory_id)
        registry.get(memory_id)
        ids, chunk_tokens = await _inject_input(request, engine, s)
        return await run(engine.inject, memory_id, ids, chunk_tokens, Deadline(s.request_timeout_s))

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _json_body(request, CompletionRequest, s.max_body_bytes)
        _check_common(req, s)
        if req.suffix or (req.best_of not in (None, 1)):
            raise bad_request("suffix and best_of are not supported", "suffix" if req.suffix else "best_of")
        prompts = _prompts(req.prompt, engine)
        max_new = s.default_max_tokens if req.max_tokens is None else req.max_tokens
        gens = [_gen_request(req, engine, ids, lead, max_new, s, logprobs=req.logprobs) for ids, lead in prompts]
        if req.stream:
            if len(gens) != 1 or req.n != 1:
                raise bad_request("streaming supports one prompt with n=1", "stream")
            return _stream(worker, engine, gens[0], s, chat=False, include_usage=_usage_wanted(req),
                           echo_text=_echo_text(engine, gens[0]) if req.echo else "")
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for g in gens:
            for _ in range(req.n):
                result, lp = await run(engine.generate, g, Deadline(s.request_timeout_s))
                text = (_echo_text(engine, g) if req.echo else "") + result.text
                choices.append({"text": text, "index": len(choices), "finish_reason": result.finish_reason,
                                "logprobs": _completion_logprobs(lp, req.echo, g) if lp is not None else None})
                prompt_tokens += len(g.ids) if _ == 0 else 0
                completion_tokens += len(result.token_ids)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": s.model_name, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _json_body(request, ChatRequest, s.max_body_bytes)
        _check_common(req, s)
        if req.logprobs:
            raise bad_request("logprobs are supported on /v1/completions only", "logprobs")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        try:
            ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        g = _gen_request(req, engine, ids, 0, s.max_tokens_limit if limit is None else limit, s, cap_default=True)
        if req.stream:
            return _stream(worker, engine, g, s, chat=True, include_usage=_usage_wanted(req))
        choices, completion_tokens = [], 0
        for i in range(req.n):
            result, _ = await run(engine.generate, g, Deadline(s.request_timeout_s))
            choices.append({"index": i, "message": {"role": "assistant", "content": result.text},
                            "finish_reason": result.finish_reason, "logprobs": None})
            completion_tokens += len(result.token_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": s.model_name, "choices": choices, "usage": _usage(len(g.ids), completion_tokens)}

    app.state.run = run


# ---------------------------------------------------------------------- request helpers
def _check_common(req, s: ServerSettings) -> None:
    if req.model != s.model_name:
        raise not_found(f"model {req.model!r} not found; this server serves {s.model_name!r}", "model")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported (only 0)", name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    if req.memory_id is not None:
        check_id(req.memory_id)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or not all(stops):
        raise bad_request("stop must be a non-empty string or a list of at most 4 of them", "stop")


def _prompts(prompt, engine: Engine) -> list[tuple[list[int], int]]:
    """The request's prompts as (ids the model reads, leading BOS stripped)."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt is empty", "prompt")
    out = []
    for p in items:
        ids = engine.tokenizer.encode(p) if isinstance(p, str) else list(p)
        ids, lead = engine.strip_bos(ids)
        if not ids:
            raise bad_request("a prompt holds no tokens (besides a BOS)", "prompt")
        engine.check_ids(ids, "prompt")
        out.append((ids, lead))
    return out


def _gen_request(req, engine: Engine, ids: list[int], lead: int, max_new: int, s: ServerSettings,
                 logprobs=None, cap_default: bool = False) -> GenRequest:
    if max_new > s.max_tokens_limit:
        raise bad_request(f"max_tokens={max_new} is above this server's limit of {s.max_tokens_limit}", "max_tokens")
    if len(ids) > s.max_prompt_tokens:
        raise bad_request(f"the prompt has {len(ids)} tokens; the limit is {s.max_prompt_tokens}", "prompt")
    engine.check_ids(ids, "prompt")
    registry_id = req.memory_id or DEFAULT_ID
    engine.registry.get(registry_id)
    temperature = 1.0 if req.temperature is None else req.temperature
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return GenRequest(memory_id=registry_id, ids=ids, max_new_tokens=max_new, do_sample=temperature > 0,
                      temperature=temperature, top_p=req.top_p, top_k=req.top_k, stop=stops, seed=req.seed,
                      retrieve=req.retrieve, logprobs=logprobs, echo_lead=lead)


def _echo_text(engine: Engine, g: GenRequest) -> str:
    return engine.tokenizer.decode(g.ids)


def _completion_logprobs(lp: dict, echo: bool, g: GenRequest) -> dict:
    start = 0 if echo else lp["prompt_len"]
    tokens, token_lp, top = lp["tokens"][start:], lp["token_logprobs"][start:], lp["top_logprobs"][start:]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": offsets}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _usage_wanted(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _memory_obj(meta: dict) -> dict:
    return {"object": "memory", **meta}


async def _inject_input(request: Request, engine: Engine, s: ServerSettings) -> tuple[list[int], int | None]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "text/plain":
        raw = await _read_body(request, s.max_inject_bytes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request(f"the text/plain body is not UTF-8 ({exc})", "body") from None
        chunk = request.query_params.get("chunk_tokens")
        if chunk is not None and not (chunk.isdigit() and int(chunk) > 0):
            raise bad_request(f"chunk_tokens={chunk!r} must be a positive integer", "chunk_tokens")
        return engine.tokenizer.encode(text), int(chunk) if chunk else None
    body = await _json_body(request, InjectRequest, s.max_inject_bytes)
    if (body.text is None) == (body.ids is None):
        raise bad_request("give exactly one of text or ids", "text")
    return (engine.tokenizer.encode(body.text) if body.text is not None else body.ids), body.chunk_tokens


# ---------------------------------------------------------------------- streaming (server-sent events)
def _stream(worker: ModelWorker, engine: Engine, g: GenRequest, s: ServerSettings, *, chat: bool,
            include_usage: bool, echo_text: str = "") -> StreamingResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    deltas = TextDeltas(engine.tokenizer, g.stop, lambda text: loop.call_soon_threadsafe(queue.put_nowait, ("delta", text)))
    task = worker.submit(engine.generate, g, Deadline(s.request_timeout_s), deltas)   # 429 raised here, before streaming
    task.add_done_callback(lambda f: queue.put_nowait(("end", f)))
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(text: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> str:
        if chat:
            delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model_name, "choices": choices}
        else:
            choices = [] if usage else [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
            body = {"id": rid, "object": "text_completion", "created": created, "model": s.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        if chat:
            yield chunk("", None, first=True)
        elif echo_text:
            yield chunk(echo_text, None)
        while True:
            kind, value = await queue.get()
            if kind == "delta":
                yield chunk(value, None)
                continue
            try:
                result, _ = value.result()
            except Exception as exc:  # noqa: BLE001 - reported to the client as an error event
                err = exc if isinstance(exc, APIError) else (
                    APIError(504, str(exc), type="timeout_error", code="timeout") if isinstance(exc, RequestTimeout)
                    else bad_request(str(exc)) if isinstance(exc, (ValueError, TypeError))
                    else APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            while not queue.empty():          # deltas queued before the end
                k, v = queue.get_nowait()
                if k == "delta":
                    yield chunk(v, None)
            yield chunk(None if chat else "", result.finish_reason)
            if include_usage:
                yield chunk(None, None, usage=_usage(len(g.ids), len(result.token_ids)))
            yield "data: [DONE]\n\n"
            return

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

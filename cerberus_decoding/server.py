"""`cerberus serve`: an OpenAI-compatible HTTP server (chat/completions, completions, models, health).

One Decoder owns one KV cache, so every generation runs on a single worker thread (a one-thread
executor is a FIFO queue plus a worker): requests wait their turn and are never interleaved. The
event loop only validates, tokenizes and relays text, so /health and bad requests stay fast while a
long generation runs. A client that goes away sets its cancel event; the worker sees it at the next
piece of text (on_text returns False) or skips the job if it had not started yet.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Decoder, Result, SamplingConfig
from .models import CerberusError
from .sampling import ACCEPTANCES, DEFAULT_ACCEPTANCE

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a prompt that fills the default model's context is < 5 MB of JSON
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error with an HTTP status, reported in OpenAI's {"error": {...}} shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_body(message: str, param=None, code=None, type="invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error"):
    return JSONResponse(error_body(message, param, code, type), status_code=status)


def failure(e: Exception) -> tuple[int, dict]:
    """Status and body for an error raised while generating: the engine's own errors are the user's."""
    if isinstance(e, CerberusError):
        return 400, error_body(str(e), code="invalid_value")
    return 500, error_body(f"Internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")


def internal_error(e: Exception) -> JSONResponse:
    return JSONResponse(failure(e)[1], status_code=500)


# ---- request validation ------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {declared} bytes; the limit is {limit}.", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def served_names(names: list[str], model_name: str, model_arg: str = "default") -> list[str]:
    """Every id the server answers to: the given names (the first is the main one), then the model's
    own name, the --model argument as given and 'default' for the default model."""
    out = []
    for name in [*names, model_name, model_arg, *(["default"] if model_arg == "default" else [])]:
        if name and name not in out:
            out.append(name)
    return out


def check_model(body: dict, served: list[str]) -> str:
    """The model id to answer with: the one asked for, if it is one of ``served``; else the main one."""
    model = body.get("model")
    if model is None:
        return served[0]  # lenient: there is only one model to pick
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string.", "model", "invalid_type")
    if model not in served:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{served[0]}' "
            f"(also known as {', '.join(repr(n) for n in served[1:]) or 'nothing else'}).",
            "model",
            "model_not_found",
        )
    return model


def max_prompt_chars(tokenizer, context_length: int) -> int:
    """An upper bound on the characters of a prompt that fits the context: no token covers more
    characters than its longest vocabulary entry has (byte-level BPE: one character per byte)."""
    return context_length * max(len(t) for t in tokenizer.get_vocab())


def prompt_chars(prompt: str | list) -> int:
    """Characters of a text prompt or of a chat's messages; 0 for token ids (check_fits counts those)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m["content"]) for m in prompt if isinstance(m, dict))


def sampling_config(body: dict, acceptance: str = DEFAULT_ACCEPTANCE) -> SamplingConfig:
    """The shared sampling parameters of both endpoints; unknown OpenAI fields are ignored.
    ``acceptance``: the server's default for the ``acceptance`` extension (docs/server.md)."""
    n = body.get("n")
    if n is not None and n != 1:
        raise APIError(400, "Only n=1 is supported.", "n", "unsupported_value")
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_param)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS  # the engine clamps it to what the context has left
    elif not _is_int(max_tokens):
        raise APIError(400, f"'{max_param}' must be an integer.", max_param, "invalid_type")
    elif max_tokens < 1:
        raise APIError(400, f"'{max_param}' must be >= 1 (got {max_tokens}).", max_param, "invalid_value")
    # default 0 (greedy, lossless) like `cerberus generate`, not OpenAI's 1: see docs/server.md
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 0.0
    elif not _is_number(temperature):
        raise APIError(400, "'temperature' must be a number.", "temperature", "invalid_type")
    elif not 0 <= temperature <= 2:
        raise APIError(
            400, f"'temperature' must be between 0 and 2 (got {temperature}).", "temperature", "invalid_value"
        )
    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p):
        raise APIError(400, "'top_p' must be a number.", "top_p", "invalid_type")
    elif not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1] (got {top_p}).", "top_p", "invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, "'seed' must be an integer.", "seed", "invalid_type")
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise APIError(400, "'seed' must fit in 64 bits.", "seed", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of them.", "stop", "invalid_type")
    if body.get("acceptance") is not None:  # our extension: exact | typical (null: the server's default)
        acceptance = body["acceptance"]
    if acceptance not in ACCEPTANCES:
        raise APIError(400, f"'acceptance' must be one of {', '.join(ACCEPTANCES)}.", "acceptance", "invalid_value")
    cfg = SamplingConfig(max_tokens, float(temperature), float(top_p), seed, stop, acceptance)
    try:
        cfg.validate()
    except CerberusError as e:
        raise APIError(400, str(e), code="invalid_value") from e
    return cfg


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean.", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object.", "stream_options", "invalid_type")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean.", "stream_options", "invalid_type")
    return bool(stream), bool(usage)


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list.", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{param}' must be an object.", param, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(
                400,
                f"'{param}.role' must be one of {', '.join(ROLES)} (got {role!r}).",
                f"{param}.role",
                "invalid_value",
            )
        out.append({"role": ROLES[role], "content": _content_text(m.get("content"), f"{param}.content")})
    return out


def _content_text(content, param: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's multi-part form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"'{param}' must be a string or a list of text parts.", param, "invalid_type")


def completion_prompt(body: dict, vocab_size: int) -> str | list[int]:
    """A text prompt, or token ids; OpenAI's batched forms are accepted only with one prompt."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty.", "prompt", "invalid_value")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise APIError(400, f"'prompt' has token ids outside [0, {vocab_size}).", "prompt", "invalid_value")
        return prompt
    raise APIError(
        400,
        "'prompt' must be a non-empty string, a list of token ids, or a list holding one "
        "of those (batches are not supported).",
        "prompt",
        "invalid_type",
    )


# ---- the worker ----------------------------------------------------------------------------------
class Worker:
    """Runs generations one at a time, in arrival order, on the decoder's one KV cache."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cerberus-decoder")
        self.pending = 0  # requests queued or running; touched only on the event loop
        self.active: set[threading.Event] = set()
        self.stopping = False  # set on SIGTERM/SIGINT: running generations end, new ones are refused

    async def run(self, ids: list[int], cfg: SamplingConfig, cancel: threading.Event, on_delta=None) -> Result:
        """Generate on the worker thread; ``on_delta`` is called there with each piece of text."""

        def job():
            if cancel.is_set() or self.stopping:
                raise _Cancelled  # the client left, or the server is stopping, while this request was queued
            return self.decoder.generate(ids, cfg, on_text=on_text)

        def on_text(delta: str) -> bool:
            if on_delta is not None:
                on_delta(delta)
            return not (cancel.is_set() or self.stopping)

        self.pending += 1
        self.active.add(cancel)
        try:
            return await asyncio.wrap_future(self.executor.submit(job))
        finally:
            cancel.set()  # if this coroutine was cancelled mid-run, stop the generation it started
            self.active.discard(cancel)
            self.pending -= 1

    def stop(self) -> None:
        """Stop running generations at their next piece of text (streams then send their final event)
        and refuse queued ones. Safe in a signal handler: it only sets a flag, takes no lock."""
        self.stopping = True

    def shutdown(self) -> None:
        self.stop()
        for cancel in list(self.active):
            cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)


class _Cancelled(Exception):
    pass


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client hangs up (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


# ---- responses -------------------------------------------------------------------------------------
def usage(result: Result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.new_tokens,
        "total_tokens": result.prompt_tokens + result.new_tokens,
    }


def stats(result: Result) -> dict:
    return {
        "method": result.method,
        "steps": len(result.steps),
        "mean_accepted": round(result.mean_accepted, 4),
        "speculative_steps": result.speculative_steps,
        "tokens_per_second": round(result.tokens_per_second, 3),
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(
    decoder: Decoder,
    model_name: str | list[str],
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    acceptance: str = DEFAULT_ACCEPTANCE,
) -> FastAPI:
    """``model_name``: the served id, or a list of ids (the first is the main one, the rest aliases).
    ``acceptance``: how sampled requests accept drafts unless they say otherwise (exact | typical)."""
    if acceptance not in ACCEPTANCES:
        raise CerberusError(f"Unknown acceptance {acceptance!r}; use one of {', '.join(ACCEPTANCES)}.")
    if api_key is not None and not api_key.strip():
        raise CerberusError("The API key is empty; give a key, or None to serve without one.")
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    model_name = names[0]
    worker = Worker(decoder)
    created = int(time.time())
    vocab_size = decoder.vocab_size
    tokenizer = getattr(getattr(decoder, "lm", None), "tokenizer", None)
    char_limit = max_prompt_chars(tokenizer, decoder.lm.context_length) if tokenizer is not None else None

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown()  # stop a running generation so shutdown does not wait for it

    # /openapi.json is served below, behind the API key; no docs pages
    app = FastAPI(title="Cerberus", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown routes and methods, in the same error shape
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def any_error(request, exc):  # last resort; the endpoints catch their own errors
        return internal_error(exc)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401, "Missing or invalid API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "cerberus"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        try:
            check_key(request)
        except APIError as e:
            return e.response()
        return app.openapi()

    # the configuration was settled (and a first-use calibration run) before the server listens
    config = None if decoder.config is None else decoder.config.to_json() | {"why": decoder.config.why()}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "method": decoder.method, "pending": worker.pending} | (
            {"config": config} if config else {}
        )

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            check_key(request)
        except APIError as e:
            return e.response()
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        try:
            check_key(request)
            check_model({"model": model}, names)
        except APIError as e:
            return e.response()
        return model_card(model)

    def check_prompt_size(prompt, param: str) -> None:
        """Refuse, without tokenizing it, a prompt too long for the context whatever its tokens."""
        chars = prompt_chars(prompt)
        if char_limit is not None and chars > char_limit:
            raise APIError(
                400,
                f"The {param} has {chars} characters; no prompt that long fits the "
                f"{decoder.lm.context_length}-token context.",
                param,
                "context_length_exceeded",
            )

    async def handle(request: Request, chat: bool):
        try:
            check_key(request)
            body = parse_body(await read_body(request, max_request_bytes))
            answer_as = check_model(body, names)
            if chat:
                prompt, param = chat_messages(body), "messages"
            else:
                prompt, param = completion_prompt(body, vocab_size), "prompt"
            check_prompt_size(prompt, param)
            cfg = sampling_config(body, acceptance)
            stream, include_usage = stream_flags(body)
            if isinstance(prompt, list) and not chat:
                ids = prompt
            else:  # off the event loop: a long prompt takes a while to tokenize
                try:
                    ids = await run_in_threadpool(decoder.encode, prompt, not chat)
                except Exception as e:  # mostly chat templates refusing a conversation (role order)
                    raise APIError(400, f"Cannot encode the {param}: {e}", param, "invalid_value") from e
            if not ids:
                raise APIError(400, f"'{param}' encodes to no tokens.", param, "invalid_value")
            try:
                decoder.check_fits(len(ids))
            except CerberusError as e:
                raise APIError(400, str(e), param, "context_length_exceeded") from e
        except APIError as e:
            return e.response()
        except Exception as e:
            return internal_error(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            events = stream_events(chat, rid, ids, cfg, include_usage, answer_as)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        cancel = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        try:
            result = await worker.run(ids, cfg, cancel)
        except _Cancelled:
            return error_response(499, "The client closed the request.", code="cancelled")
        except Exception as e:
            status, body = failure(e)
            return JSONResponse(body, status_code=status)
        finally:
            watcher.cancel()
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": answer_as,
            "choices": [choice],
            "usage": usage(result),
            "cerberus": stats(result),
        }

    async def stream_events(chat: bool, rid: str, ids, cfg, include_usage: bool, model_name: str):
        """SSE chunks. Starlette cancels this generator when the client disconnects; `finally` then
        sets the cancel event, which stops the generation at its next piece of text."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        cancel = threading.Event()
        now = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": kind, "created": now, "model": model_name, "choices": [choice]}
            if include_usage:
                out["usage"] = None  # OpenAI sends null usage on every chunk but the last
            return out | extra

        def on_delta(delta: str) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, delta)
            except RuntimeError:  # the event loop is gone (shutting down)
                cancel.set()

        task = asyncio.ensure_future(worker.run(ids, cfg, cancel, on_delta))
        getter = None
        try:
            if chat:
                yield sse(chunk(None, role=True))
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse(chunk(getter.result()))
                    continue
                # all text is queued before the job's result arrives (both go through call_soon_threadsafe)
                getter.cancel()
                if queue.empty():
                    break
            try:
                result = task.result()
            except _Cancelled:  # the server is stopping before this request started
                yield sse(chunk(None, "cancelled"))
                yield sse("[DONE]")
                return
            except Exception as e:
                yield sse(failure(e)[1])
                return
            yield sse(chunk(None, result.finish_reason, cerberus=stats(result)))
            if include_usage:
                yield sse(
                    {
                        "id": rid,
                        "object": kind,
                        "created": now,
                        "model": model_name,
                        "choices": [],
                        "usage": usage(result),
                        "cerberus": stats(result),
                    }
                )
            yield sse("[DONE]")
        finally:
            cancel.set()
            task.cancel()  # Worker.run's own finally releases its bookkeeping
            if getter is not None:
                getter.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def serve(
    decoder: Decoder,
    host: str,
    port: int,
    model_name: str | list[str],
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    acceptance: str = DEFAULT_ACCEPTANCE,
) -> None:
    app = create_app(decoder, model_name, api_key, max_request_bytes, acceptance)
    names = [model_name] if isinstance(model_name, str) else model_name
    print(
        f"Serving {names[0]} ({decoder.method}) at http://{host}:{port}/v1"
        + (f" (also as {', '.join(names[1:])})" if names[1:] else "")
        + (" (API key required)" if api_key else "")
        + f"; sampling with {acceptance} acceptance",
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=2)
    StoppingServer(config, app.state.worker).run()


class StoppingServer(uvicorn.Server):
    """uvicorn's server, but a shutdown signal (SIGTERM, Ctrl-C) first stops the running generations:
    a stream gets its final event (finish_reason "cancelled") and the server exits within seconds,
    instead of waiting for every stream to finish."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame) -> None:
        self.worker.stop()
        super().handle_exit(sig, frame)

"""`xiaolm serve`: an OpenAI-compatible HTTP API over the batched engine, and an offline chat page.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed by SSE as the
OpenAI API streams, or whole), GET /health, and GET / (the chat page, serve/static/chat.html).

Every request that decodes becomes an engine Request (inference/engine.py); the engine's loop,
decoding all running requests together, hands each request's text to its handler through an
asyncio queue. A client that goes away cancels its request, which frees its slot at the next step.
`xiaolm serve` runs the engine's loop on the main thread, the one that loaded the model, and the
HTTP server on a second thread: PyTorch's CPU kernels run on OpenMP thread teams, one per thread
that enters them, and once two threads have entered them libgomp (oversubscribed) barely lets its
idle workers spin, so every parallel kernel waits for a woken thread (the compiled decode step,
which runs many short kernels, measured 2-3x slower on a second thread: docs/benchmarks.md,
section 12).
`create_app` alone (an app for another ASGI server, the tests) runs the loop on a thread of its
own.

Safe by default: listens on 127.0.0.1; with an API key every /v1/ call needs
`Authorization: Bearer KEY` (compared in constant time); body size, messages, prompt tokens,
max_tokens and waiting requests are limited; every client error is a 4xx with the OpenAI error
body, and the server goes on serving. Weights come from safetensors only (checkpoint.load_model
never unpickles).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("xiaolm serve needs FastAPI and uvicorn: pip install 'xiaolm[serve]'") from error

from xiaolm.checkpoint import LoadedModel
from xiaolm.config import ServeConfig
from xiaolm.inference.chat import chat_prompt_ids
from xiaolm.inference.engine import FINISH_ERROR, Engine, QueueFull, Request
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.serve.api import (
    ApiError, ChatCompletionRequest, CompletionRequest, error_body, message_text, new_id, now,
    refuse_unsupported, stop_strings, usage,
)

logger = logging.getLogger("xiaolm.serve")
API_KEY_ENV = "XIAOLM_API_KEY"


class Server:
    """The engine (and its thread, when `start`ed), and what every handler needs: tokenizer, limits,
    model id."""

    def __init__(self, loaded: LoadedModel, config: ServeConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.model_id = config.model_name or loaded.path.name
        self.created = now()
        self.api_key = config.api_key or os.environ.get(API_KEY_ENV, "")
        self.engine = Engine(loaded.model, loaded.tokenizer, num_slots=config.num_slots,
                             max_len=config.max_context or None, max_waiting=config.max_waiting,
                             compile=config.compile)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the engine's loop on its thread (again, after `stop`); a no-op while it runs."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.engine.warm_up()  # with compile: the decode step compiles now, before the first request
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_engine, name="xiaolm-engine", daemon=True)
        self._thread.start()

    def run_engine(self) -> None:
        """The engine's loop on this thread until `stop` (`start`'s thread; `serve` runs it on the
        main thread)."""
        self.engine.run_forever(self._stop, lambda error: logger.exception("engine step failed", exc_info=error))

    def stop(self) -> None:
        """End the engine's loop: the requests it holds end as cancelled; later ones wait for `start`."""
        self._stop.set()
        self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- building a request --------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_id}' "
                           "(GET /v1/models)", "model", "model_not_found")

    def sampling(self, body: ChatCompletionRequest | CompletionRequest, num_prompt: int) -> SamplingConfig:
        refuse_unsupported(body)
        self.check_model(body.model)
        if num_prompt >= self.engine.max_len:
            raise ApiError(400, f"the prompt is {num_prompt} tokens; this model's context holds "
                           f"{self.engine.max_len} tokens, the reply included", "messages",
                           "context_length_exceeded")
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > self.config.max_tokens:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{param} is {asked}; this server allows at most {self.config.max_tokens}", param)
        return SamplingConfig(
            max_new_tokens=asked or self.config.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=None if body.seed is None else body.seed % 2**63,
        )

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if len(body.messages) > self.config.max_messages:
            raise ApiError(400, f"{len(body.messages)} messages; this server allows at most "
                           f"{self.config.max_messages}", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
                    for i, m in enumerate(body.messages)]
        return chat_prompt_ids(self.tokenizer, messages)

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request: send several requests (they are decoded together)",
                               "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode_prompt(prompt)  # as `xiaolm generate` encodes it (BOS, empty prompt)
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        vocab_size = self.engine.model.config.vocab_size
        if not all(0 <= token < vocab_size for token in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        return list(prompt)

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, stops: tuple[str, ...]
               ) -> tuple[Request, asyncio.Queue]:
        """Queue a request; its text arrives on the returned queue, then None when it has finished."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(_: Request, text: str | None) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, text)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        request = Request(prompt_ids, sampling, stop_ids=frozenset(self.tokenizer.stop_ids), stop_strings=stops,
                          listener=deliver)
        try:
            self.engine.submit(request)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy ({error}); retry shortly", None, "queue_full",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from error
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from error
        return request, queue


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _collect(http: HttpRequest, request: Request, queue: asyncio.Queue) -> str:
    """The whole reply of a non-streamed request; cancels it if the client goes away meanwhile."""
    pieces = []
    while True:
        try:
            text = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                request.cancel()
            continue
        if text is None:
            return "".join(pieces)
        pieces.append(text)


def _raise_if_failed(request: Request) -> None:
    if request.finish_reason == FINISH_ERROR:
        raise ApiError(500, f"generation failed: {request.error}", None, "engine_error", kind="server_error")


async def _stream(request: Request, queue: asyncio.Queue, chunk, include_usage: bool) -> AsyncIterator[str]:
    """SSE as the OpenAI API sends it: `chunk(text, finish_reason)` for each piece and a final chunk,
    the usage chunk when asked, then [DONE]. Leaving early (the client went away) cancels."""
    try:
        first = chunk(None, None)
        if first is not None:
            yield _sse(first)
        while (text := await queue.get()) is not None:
            yield _sse(chunk(text, None))
        if request.finish_reason == FINISH_ERROR:
            yield _sse(error_body(f"generation failed: {request.error}", "server_error", None, "engine_error"))
        else:
            yield _sse(chunk("", request.finish_reason))
            if include_usage:
                yield _sse({**chunk("", None), "choices": [],
                            "usage": usage(len(request.prompt_ids), len(request.output_ids))})
        yield _sse("[DONE]")
    finally:
        request.cancel()  # a no-op once finished; frees the slot of a request whose client left


def create_app(loaded: LoadedModel, config: ServeConfig, engine_thread: bool = True) -> FastAPI:
    """The FastAPI app serving `loaded`; the engine thread runs while the app does (lifespan). With
    `engine_thread` False the caller runs the engine's loop (`serve` does, on the main thread)."""
    server = Server(loaded, config)

    async def lifespan(app: FastAPI):
        if not engine_thread:
            yield
            return
        server.start()
        try:
            yield
        finally:
            server.stop()

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN; the schema is at /openapi.json
    app = FastAPI(title="xiaolm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API of a xiaolm model, with batched decoding.")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: HttpRequest, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        else:
            message = f"{param or 'body'}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(_: HttpRequest, error: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=error)
        return JSONResponse(error_body(f"internal error: {type(error).__name__}", "server_error"), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("xiaolm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        # everything the page needs is in the page: it may reach this server and nothing else
        policy = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                  "connect-src 'self'; img-src 'self' data:")
        return HTMLResponse(html, headers={"Content-Security-Policy": policy})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, "auth_required": bool(server.api_key),
                "context_length": server.engine.max_len, "max_tokens": config.max_tokens,
                "num_slots": server.engine.num_slots, "num_running": server.engine.num_running,
                "num_waiting": server.engine.num_waiting}

    def model_card() -> dict[str, Any]:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "xiaolm"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return model_card()

    async def generate(http: HttpRequest, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
                       chat: bool):
        """Run one request and answer as the OpenAI API does: chat completion or text completion,
        streamed (SSE chunks) or whole."""
        sampling = server.sampling(body, len(prompt_ids))
        request, queue = server.submit(prompt_ids, sampling, stop_strings(body.stop))
        http.state.generation = request  # for the request's log line
        head = {"id": new_id("chatcmpl" if chat else "cmpl"), "created": now(), "model": server.model_id}
        if chat:
            head["system_fingerprint"] = None

        def choice(text: str | None, finish_reason: str | None, whole: bool = False) -> dict[str, Any]:
            if not chat:
                return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish_reason}
            if whole:
                message = {"role": "assistant", "content": text, "refusal": None}
                return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            # the first chunk names the role; the final one has an empty delta and the finish reason
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str | None, finish_reason: str | None) -> dict[str, Any] | None:
                if text is None and not chat:
                    return None  # text completions have no role chunk
                data = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                        "choices": [choice(text, finish_reason)]}
                return {**data, "usage": None} if include_usage else data

            return StreamingResponse(_stream(request, queue, chunk, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = await _collect(http, request, queue)
        _raise_if_failed(request)
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [choice(text, request.finish_reason, whole=True)],
                "usage": usage(len(prompt_ids), len(request.output_ids))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        return await generate(http, body, server.chat_prompt(body), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await generate(http, body, server.completion_prompt(body), chat=False)

    app.add_middleware(Guard, server=server, max_body_bytes=config.max_body_bytes)
    app.add_middleware(RequestLog)  # added last: outermost, so it logs what Guard refuses too
    return app


class RequestLog:
    """ASGI middleware: one log line per request, as its response ends: status, and for
    generations prompt/completion tokens, time to first token and tokens per second."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, logged = time.perf_counter(), [0], [False]
        scope.setdefault("state", {})

        def log() -> None:
            if not logged[0]:
                logged[0] = True
                logger.info(request_line(scope, status[0], time.perf_counter() - started))

        async def logging_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                log()  # before the last byte leaves: a client that has its answer finds the line written
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            log()


def request_line(scope, status: int, seconds: float) -> str:
    line = f"{scope['method']} {scope['path']} {status or 'disconnected'} {seconds:.3f}s"
    request = scope.get("state", {}).get("generation")
    if request is not None:
        num_output = len(request.output_ids)
        line += f" prompt={len(request.prompt_ids)} completion={num_output}"
        if request.first_token_at is not None:
            line += f" ttft={request.first_token_at - request.submitted_at:.3f}s"
            if request.finished_at is not None and num_output > 1:
                rate = (num_output - 1) / max(request.finished_at - request.first_token_at, 1e-9)
                line += f" {rate:.1f}tok/s"
        line += f" finish={request.finish_reason}"
    return line


class Guard:
    """ASGI middleware in front of everything: the body size limit (413) and, with an API key, the
    bearer token on /v1/ (401), checked before any parsing."""

    def __init__(self, app, server: Server, max_body_bytes: int) -> None:
        self.app, self.server, self.max_body_bytes = app, server, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.server.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
            return await self._refuse(scope, receive, send, 401, "invalid_api_key", "authentication_error",
                                      "a valid API key is needed: send 'Authorization: Bearer KEY'")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._refuse(scope, receive, send, 413, "body_too_large", "invalid_request_error",
                                      f"the body is larger than this server's limit of {self.max_body_bytes} bytes")
        # read the whole body here (it is small), so a body without a length is held to the limit too
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._refuse(scope, None, send, 413, "body_too_large", "invalid_request_error",
                                          f"the body is larger than this server's limit of {self.max_body_bytes} "
                                          "bytes")
            if not message.get("more_body", False):
                break
        replayed = [False]

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # constant time: how many leading characters match does not show in the response time
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.server.api_key.encode())

    async def _refuse(self, scope, receive, send, status: int, code: str, kind: str, message: str) -> None:
        await JSONResponse(error_body(message, kind, None, code), status_code=status)(scope, receive, send)


def serve(checkpoint, config: ServeConfig) -> None:
    """Load the checkpoint and serve it until interrupted (`xiaolm serve`): the engine's loop on this
    thread (see the module's docstring), the HTTP server on another. The first SIGINT or SIGTERM
    stops accepting connections and lets the requests in progress finish; a second one ends them."""
    import uvicorn

    from xiaolm.checkpoint import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loaded = load_model(checkpoint, config.device)
    # the model id: the folder asked for (a run folder's name, not that of its latest step_ folder)
    config = dataclasses.replace(config, model_name=config.model_name or Path(checkpoint).resolve().name)
    app = create_app(loaded, config, engine_thread=False)
    server = app.state.server
    auth = "on" if server.api_key else "off (anyone who can reach the port may use it)"
    logger.info(f"serving {server.model_id} ({loaded.model.num_parameters():,} parameters) from {loaded.path}: "
                f"{config.num_slots} slots, context {server.engine.max_len}, API key {auth}")
    server.engine.warm_up()  # with compile: the decode step compiles now, before the server listens
    http = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=False,
                                         log_level="info"))

    def listen() -> None:
        try:
            http.run()  # off the main thread uvicorn leaves the signals alone: they are handled below
        finally:
            server.stop()  # the HTTP server has ended: so does the engine's loop

    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signum)
        http.should_exit = True  # no new connections; the requests in progress finish
        if len(received) > 1:  # asked twice: end them now (the loop ends them as it stops, and uvicorn,
            server._stop.set()  # with no request left, finishes its shutdown)

    # (Python lets only the main thread set handlers; called from another, serve leaves them alone)
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    thread = threading.Thread(target=listen, name="xiaolm-http", daemon=True)
    thread.start()
    try:
        server.run_engine()
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:  # end as the signal says (SIGINT: KeyboardInterrupt, exit status 130)
        signal.raise_signal(received[0])
    if not http.started:
        raise SystemExit(1)  # uvicorn said why (e.g. the port is in use)

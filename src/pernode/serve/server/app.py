"""The FastAPI app: OpenAI routes, health, metrics, tokenizer routes, API-key and body-size guards.

`build_app(engine_or_config, settings)` takes a loaded `LLMEngine` (ready at once) or an `EngineConfig` (loaded
in a thread after startup, /health answering 503 until it is ready).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from pernode.config import EngineConfig
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.server.capacity import fit_context
from pernode.serve.server.errors import APIError, bad_request, install_error_handlers
from pernode.serve.server.guard import Guard, too_large
from pernode.serve.server.metrics import CONTENT_TYPE
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.protocol import DetokenizeRequest, TokenizeRequest, chat_messages, check_model, parse_body
from pernode.serve.server.state import ServerState

log = logging.getLogger("pernode.serve.server")


def warm_up(engine: LLMEngine) -> None:
    """One 1-token request through the engine before serving: the first forward loads (or builds) the attention
    kernel and touches the weights, which the first user should not wait for."""
    if engine.has_unfinished_requests():
        return
    token = engine.tokenizer.bos_token_id or 0
    engine.add_request("pernode-warm-up", [token], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, at most max_bytes (413), received within timeout_s (408: a slow upload holds a slot no longer)."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (body_read_timeout_s="
                            f"{timeout_s:g}): send it whole and promptly", code="request_timeout") from None
    return b"".join(chunks)


async def _until_disconnect(request: Request, handler):
    """Run a handler; if the client goes away first, cancel it (its cleanup aborts its engine requests)."""
    task = asyncio.ensure_future(handler)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled (server shutdown): take the handler down with us
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
            pass
        return Response(status_code=499)
    return task.result()


def build_app(engine_or_config: LLMEngine | EngineConfig, settings: ServerSettings | None = None,
              on_ready: Callable[[LLMEngine], None] | None = None,
              on_load_failed: Callable[[str], None] | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    settings.validate()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def ready(engine: LLMEngine) -> None:
            state.attach(engine, loop)
            if on_ready is not None:
                on_ready(engine)

        def failed(message: str) -> None:
            state.fail(message)
            if on_load_failed is not None:
                on_load_failed(message)

        if isinstance(engine_or_config, LLMEngine):
            try:
                fit_context(engine_or_config)
            except ValueError as exc:
                log.error("the engine cannot serve: %s", exc)
                failed(str(exc))
            else:
                await asyncio.to_thread(warm_up, engine_or_config)
                ready(engine_or_config)
        else:
            def load() -> None:
                try:
                    engine = LLMEngine(engine_or_config)
                    fit_context(engine)  # at start, not at every request: the cache holds one max_model_len
                    warm_up(engine)
                except ValueError as exc:  # a user error (unknown model, bad size): one line, no traceback
                    log.error("loading the model failed: %s", exc)
                    outcome = (failed, str(exc))
                except Exception as exc:  # noqa: BLE001 - reported through /health and the log
                    log.exception("loading the model failed")
                    outcome = (failed, f"{type(exc).__name__}: {exc}")
                else:
                    outcome = (ready, engine)
                try:
                    loop.call_soon_threadsafe(*outcome)
                except RuntimeError:  # the server stopped while the model loaded
                    pass

            threading.Thread(target=load, name="pernode-load", daemon=True).start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="pernode", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    if settings.allowed_origins:  # browsers of the allowed sites get CORS answers (preflight included)
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, settings=settings)  # added last: the outermost layer, before CORS and every route

    async def body_of(request: Request) -> bytes:
        return await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)

    @app.get("/health")
    async def health():
        status = state.health()
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        body = state.metrics.exposition() if state.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/metrics/steps")
    async def step_records(after: int = -1):
        """The engine's last steps one by one (serve/engine/step_clock.py): index, wall and CPU seconds, decodes,
        prompt chunks as [tokens, prompt length], whether it started an idle engine, seconds since the step before
        ended; those after step `after`. A validation reads its engine's speed
        from them."""
        if state.async_engine is None:
            state.serving_or_503()
        clock = state.async_engine.step_clock
        rows = clock.records_from(after + 1)
        return {"next": clock.reading()[0],
                "steps": [[r.index, r.wall_s, r.cpu_s, r.decodes, [list(c) for c in r.chunks], r.from_idle,
                           r.gap_s] for r in rows]}

    @app.get("/v1/models")
    async def models():
        if state.engine is None:
            state.serving_or_503()
        return {"object": "list", "data": [{
            "id": state.served_names[0], "object": "model", "created": state.created, "owned_by": "pernode",
            "root": state.served_names[0], "max_model_len": state.engine.max_model_len}]}  # never the file path

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival_s = time.monotonic()  # queue time and TTFT count from here, body and tokenization included
        serving = state.serving_or_503()
        raw = await body_of(request)
        return await _until_disconnect(request, serving.completions(raw, arrival_s))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival_s = time.monotonic()  # queue time and TTFT count from here, body and tokenization included
        serving = state.serving_or_503()
        raw = await body_of(request)
        return await _until_disconnect(request, serving.chat(raw, arrival_s))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        serving = state.serving_or_503()
        req = parse_body(TokenizeRequest, await body_of(request))
        check_model(req.model, state.served_names)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt (a string) or messages (a chat)", param="prompt")
        tok = serving.tokenizer
        if req.messages is not None:
            messages = chat_messages(req.messages)
            add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt

            def run() -> list[int]:
                try:
                    text = tok.apply_chat_template(messages, add_generation_prompt=add_gen)
                except Exception as exc:  # noqa: BLE001 - the template rejected the conversation
                    raise bad_request(f"messages: the model's chat template rejected them ({exc})",
                                      param="messages") from None
                return tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            def run() -> list[int]:
                add = True if req.add_special_tokens is None else req.add_special_tokens
                return tok.encode(req.prompt, add_special_tokens=add)
        ids = await asyncio.to_thread(run)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        serving = state.serving_or_503()
        req = parse_body(DetokenizeRequest, await body_of(request))
        check_model(req.model, state.served_names)
        vocab = state.engine.model_config.vocab_size
        bad = [(i, t) for i, t in enumerate(req.tokens) if not 0 <= t < vocab]
        if bad:
            i, t = bad[0]
            raise bad_request(f"tokens[{i}]={t} is out of range: allowed token ids in [0, {vocab})",
                              param="tokens")
        text = await asyncio.to_thread(serving.tokenizer.decode, req.tokens)
        return {"prompt": text}

    return app

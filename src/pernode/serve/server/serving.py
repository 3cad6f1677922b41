"""`/v1/completions` and `/v1/chat/completions`: request -> engine requests -> OpenAI-shaped responses or SSE.

Prompts are tokenized and checked against the context and the KV cache in a worker thread, before anything
reaches the engine, so a bad request costs the engine nothing. A request whose client goes away is aborted at
once, streaming or not, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, StreamingResponse

from pernode.serve.engine.outputs import RequestOutput
from pernode.serve.sampling.params import SamplingParams
from pernode.serve.server.async_engine import AsyncEngine, EngineFailure, EngineUnavailable, QueueFull, ResponseStream
from pernode.serve.server.errors import APIError, bad_request, error_body, param_of
from pernode.serve.server.logprobs_format import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.tools import (ToolPlan, new_call_id, parse_tool_calls, plan_tools, render_messages,
                                        template_supports_tools)
from pernode.serve.server.protocol import (ChatCompletionRequest, CompletionRequest, chat_messages, chat_params,
                                           check_model, check_num_seqs, completion_params, parse_body, precheck_sizes,
                                           prompt_list)

RETRY_AFTER_S = 1
def _sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _EngineStreamResponse(StreamingResponse):
    """SSE whose engine requests are aborted however the response ends, even if its body never started
    (a client gone before the first byte)."""

    def __init__(self, body: AsyncIterator[str], stream: ResponseStream):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.abort()


@dataclass
class Prompt:
    token_ids: list[int]
    text: str  # the prompt as text (for echo)
    token_strs: list[str] = field(default_factory=list)  # per token, only when echo needs logprobs


@dataclass
class _Choice:
    """Streaming state of one returned choice."""

    index: int
    text_offset: int = 0
    started: bool = False  # chat: the role delta went out
    started_tool: bool = False  # chat: the first tool-call delta went out
    finished: bool = False


class OpenAIServing:
    def __init__(self, async_engine: AsyncEngine, served_names: tuple[str, ...], caps: ServerSettings):
        self.engine = async_engine
        self.llm = async_engine.engine
        self.tokenizer = async_engine.engine.tokenizer
        self.served_names = served_names
        self.model_name = served_names[0]
        self.caps = caps

    # ---- shared -----------------------------------------------------------------------------------------
    def _encode(self, prompt: str | list[int], params: SamplingParams, add_special_tokens: bool, where: str,
                want_token_strs: bool) -> Prompt:
        """Runs in a worker thread: tokenize and check against context and cache (read-only engine state)."""
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt
        else:
            ids, text = list(prompt), None
        try:
            self.llm.validate_prompt(ids, params)
        except ValueError as exc:
            message = str(exc)
            if message.startswith(("logit_bias", "allowed_token_ids")):
                raise bad_request(message, param=message.split("=")[0].split("[")[0]) from None
            message = str(exc)
            param = param_of(message, default="prompt" if where.startswith("prompt") else "messages")
            raise bad_request(message if where == "prompt" else f"{where}: {message}", param=param) from None
        spec = params.structured_outputs
        if spec is not None:  # compiled here, off the event loop: a bad schema or grammar is a 400
            try:
                self.llm.structured_outputs.validate(spec)
            except ValueError as exc:
                raise bad_request(str(exc), param=spec.field_name) from None
        if text is None:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        strs = [self.tokenizer.token_to_str(t) for t in ids] if want_token_strs else []
        return Prompt(ids, text, strs)

    def _submit(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
                arrival_s: float) -> ResponseStream:
        try:
            return self.engine.submit(request_id, [p.token_ids for p in prompts], params, arrival_s)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), code="unavailable") from None

    @staticmethod
    def _usage(prompts: list[Prompt], finals: list[RequestOutput | None]) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for f in finals if f for c in f.outputs)
        cached = sum(f.num_cached_tokens for f in finals if f)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _collect(self, stream: ResponseStream) -> list[RequestOutput]:
        """Wait for every prompt's final output; APIError if any failed (its siblings are aborted)."""
        finals: list[RequestOutput | None] = [None] * len(stream.request_ids)
        try:
            while not stream.finished:
                index, item = await stream.next()
                if isinstance(item, EngineFailure):
                    raise APIError(item.status, item.message, code="engine_error" if item.status == 500 else None)
                if item.finished:
                    finals[index] = item
        finally:
            stream.abort()  # what is unfinished: a failed sibling's, or the client went away (cancelled)
        return finals  # type: ignore[return-value]

    async def _events(self, stream: ResponseStream, chunks, final_chunks) -> AsyncIterator[str]:
        """SSE body: the chunks of each output, then the final ones; an error event if the engine fails.
        Aborts what is unfinished when the client disconnects (the generator is cancelled or closed)."""
        finals: list[RequestOutput | None] = [None] * len(stream.request_ids)
        try:
            while not stream.finished:
                index, item = await stream.next()
                if isinstance(item, EngineFailure):
                    yield _sse(error_body(item.status, item.message, code="engine_error"))
                    yield _sse("[DONE]")
                    return
                if item.finished:
                    finals[index] = item
                for chunk in chunks(index, item):
                    yield _sse(chunk)
            for chunk in final_chunks(finals):
                yield _sse(chunk)
            yield _sse("[DONE]")
        finally:
            stream.abort()

    def _parse_completion(self, raw: bytes) -> CompletionRequest:
        precheck_sizes(raw, self.caps)
        return parse_body(CompletionRequest, raw)

    def _parse_chat(self, raw: bytes) -> ChatCompletionRequest:
        precheck_sizes(raw, self.caps)
        return parse_body(ChatCompletionRequest, raw)

    # ---- /v1/completions --------------------------------------------------------------------------------
    async def completions(self, raw: bytes, arrival_s: float) -> JSONResponse | StreamingResponse:
        # parsed off the event loop: a large body must not stall other requests' streams
        req = await asyncio.to_thread(self._parse_completion, raw)
        check_model(req.model, self.served_names)
        params = completion_params(req, self.caps)
        texts = prompt_list(req.prompt)
        check_num_seqs(len(texts), params.n, self.caps)  # before any tokenizing: refused requests cost nothing
        echo_lps = bool(req.echo) and params.logprobs is not None

        def encode_all() -> list[Prompt]:
            return [self._encode(p, params, True, "prompt" if len(texts) == 1 else f"prompt[{i}]", echo_lps)
                    for i, p in enumerate(texts)]

        prompts = await asyncio.to_thread(encode_all)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = self._submit(request_id, prompts, params, arrival_s)
        head = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}
        n = params.n
        # echo with max_tokens=0 scores the prompt only: the one token the engine ran is left out
        prompt_only = bool(req.echo) and req.max_tokens == 0

        if not req.stream:
            finals = await self._collect(stream)
            choices = []
            for p, (prompt, out) in enumerate(zip(prompts, finals)):
                for c in out.outputs:
                    echo = prompt.text if req.echo else ""
                    generated, gen_lps = ("", []) if prompt_only else (c.text, c.logprobs or [])
                    lps = None
                    if params.logprobs is not None:
                        lps, _ = completion_logprobs(gen_lps, 0, prompt.token_strs if req.echo else [],
                                                       out.prompt_logprobs if req.echo else None)
                    choice = {"index": p * n + c.index, "text": echo + generated, "logprobs": lps,
                              "finish_reason": "length" if prompt_only else c.finish_reason,
                              "stop_reason": None if prompt_only else c.stop_reason}
                    if req.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs)
                    choices.append(choice)
            if prompt_only:
                for out in finals:
                    out.outputs = [dataclasses.replace(c, token_ids=[]) for c in out.outputs]
            return JSONResponse({**head, "choices": choices, "usage": self._usage(prompts, finals),
                                 "system_fingerprint": None})

        state = {(p, i): _Choice(p * n + i) for p in range(len(prompts)) for i in range(n)}

        def chunks(p: int, out: RequestOutput):
            for c in out.outputs:
                ch = state[(p, c.index)]
                if ch.finished:
                    continue
                text, lps = ("", None) if prompt_only else (c.delta_text, None)
                echo_strs: list[str] = []
                echo_lps = None
                if req.echo and not ch.started:
                    text = prompts[p].text + text
                    echo_strs, echo_lps = prompts[p].token_strs, out.prompt_logprobs
                if params.logprobs is not None:
                    delta = [] if prompt_only else (c.delta_logprobs or [])
                    lps, ch.text_offset = completion_logprobs(delta, ch.text_offset, echo_strs, echo_lps)
                if not text and not c.finish_reason and not (lps and lps["tokens"]):
                    continue
                ch.started = True
                ch.finished = c.finish_reason is not None
                yield {**head, "choices": [{"index": ch.index, "text": text, "logprobs": lps,
                                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}

        def final_chunks(finals):
            if req.include_usage:
                yield {**head, "choices": [], "usage": self._usage(prompts, finals)}

        return _EngineStreamResponse(self._events(stream, chunks, final_chunks), stream)

    # ---- /v1/chat/completions ---------------------------------------------------------------------------
    async def chat(self, raw: bytes, arrival_s: float) -> JSONResponse | StreamingResponse:
        req = await asyncio.to_thread(self._parse_chat, raw)
        check_model(req.model, self.served_names)
        tool_plan = plan_tools(req.tools, req.tool_choice)
        params = chat_params(req, self.caps, tool_plan)
        check_num_seqs(1, params.n, self.caps)
        native_tools = template_supports_tools(self.tokenizer.chat_template)
        messages = render_messages(chat_messages(req.messages), req.messages, tool_plan, native_tools)
        template_kwargs = {"tools": [t.to_openai() for t in tool_plan.tools]} if native_tools and tool_plan.active else {}
        add_generation_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt

        def encode() -> Prompt:
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          **template_kwargs)
            except ValueError as exc:
                raise bad_request(str(exc), param="messages") from None
            except Exception as exc:  # the model's template rejected the conversation (jinja raise_exception)
                raise bad_request(f"messages: the model's chat template rejected them ({exc})",
                                  param="messages") from None
            # The template already writes any bos; as transformers, add no special tokens on top.
            return self._encode(text, params, False, "messages", False)

        prompt = await asyncio.to_thread(encode)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = self._submit(request_id, [prompt], params, arrival_s)
        head = {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name}

        if not req.stream:
            (out,) = await self._collect(stream)
            choices = []
            for c in out.outputs:
                content, calls = parse_tool_calls(c.text, tool_plan)
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": c.index, "message": message,
                                "logprobs": chat_logprobs(self.tokenizer, c.logprobs) if req.logprobs else None,
                                "finish_reason": "tool_calls" if calls and c.finish_reason == "stop"
                                else c.finish_reason, "stop_reason": c.stop_reason})
            return JSONResponse({**head, "choices": choices, "usage": self._usage([prompt], [out]),
                                 "system_fingerprint": None})

        head["object"] = "chat.completion.chunk"
        state = {i: _Choice(i) for i in range(params.n)}
        usage_null = {"usage": None} if req.include_usage else {}

        def chunks(_: int, out: RequestOutput):
            for c in out.outputs:
                ch = state[c.index]
                if ch.finished:
                    continue
                if not ch.started:
                    ch.started = True
                    yield {**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}], **usage_null}
                lps = chat_logprobs(self.tokenizer, c.delta_logprobs) if req.logprobs else None
                finish_reason = c.finish_reason
                if tool_plan.active:  # tool calls go out as tool_calls deltas
                    delta, finish_reason = self._tool_delta(ch, c, tool_plan)
                    if delta:
                        yield {**head, "choices": [{"index": c.index, "delta": delta, "logprobs": lps,
                                                    "finish_reason": None}], **usage_null}
                elif c.delta_text or (lps and lps["content"]):
                    yield {**head, "choices": [{"index": c.index, "delta": {"content": c.delta_text},
                                                "logprobs": lps, "finish_reason": None}], **usage_null}
                if c.finish_reason is not None:
                    ch.finished = True
                    yield {**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                                "finish_reason": finish_reason, "stop_reason": c.stop_reason}],
                           **usage_null}

        def final_chunks(finals):
            if req.include_usage:
                yield {**head, "choices": [], "usage": self._usage([prompt], finals)}

        return _EngineStreamResponse(self._events(stream, chunks, final_chunks), stream)

    @staticmethod
    def _tool_delta(ch: _Choice, c, plan: ToolPlan) -> tuple[dict | None, str | None]:
        """The delta of a choice under tools, and its finish reason. A named function's arguments stream as they
        are generated; otherwise the text is held until the end, then sent as content or as tool calls."""
        if plan.choice == "named":
            delta = None
            if not ch.started_tool:
                ch.started_tool = True
                delta = {"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                         "function": {"name": plan.named, "arguments": c.delta_text}}]}
            elif c.delta_text:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": c.delta_text}}]}
            finish = "tool_calls" if c.finish_reason == "stop" else c.finish_reason
            return delta, finish
        if c.finish_reason is None:
            return None, None
        content, calls = parse_tool_calls(c.text, plan)
        if calls:
            return ({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]},
                    "tool_calls" if c.finish_reason == "stop" else c.finish_reason)
        return ({"content": content} if content else None), c.finish_reason

"""OpenAI request bodies as pydantic models, and their translation into the engine's `SamplingParams`.

Types are checked strictly here (a string is not a number); ranges are checked by `SamplingParams` and by the
server's caps, so each rule lives in one place and every 400 names the field, the value and what is allowed.
Unknown fields are ignored, as OpenAI-compatible servers do; fields of OpenAI's API that this server does not
implement are typed, and rejected when set to something other than their neutral value.
"""
from __future__ import annotations

import json
from typing import Union

from pydantic import BaseModel, ConfigDict, ValidationError

from pernode.serve.sampling.params import SamplingParams
from pernode.serve.sampling.structured.spec import StructuredOutputs
from pernode.serve.server.errors import APIError, bad_request, from_validation_error, param_of, short_repr
from pernode.serve.server.options import ServerSettings
from pernode.serve.server.tools import ToolPlan

PromptInput = Union[str, list[str], list[int], list[list[int]]]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingFields(_Strict):
    model: str | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    # vLLM's structured-output fields
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # OpenAI fields this server does not implement: accepted only at their neutral value.
    best_of: int | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = 16  # OpenAI's default for the legacy endpoint
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    prompt_logprobs: int | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


_MODELS = (StreamOptions, CompletionRequest, TextPart, ChatMessage, ChatCompletionRequest, TokenizeRequest,
           DetokenizeRequest)
FIELD_NAMES = {name for m in _MODELS for name in m.model_fields}
TYPE_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "tool_choice": "a string or an object",
}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_body(model: type[BaseModel], raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc, FIELD_NAMES, TYPE_HINTS) from None


def _check_cap(name: str, value: int | None, low: int, high: int, setting: str) -> None:
    if value is not None and not low <= value <= high:
        raise bad_request(f"{name}={value} is out of range: allowed {low}..{high} on this server (server setting "
                          f"{setting})", param=name)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """JSON's string keys as token ids; 400 naming logit_bias for a key that is not one."""
    if not raw:
        return None
    out = {}
    for key, bias in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if token_id < 0 or str(token_id) != key.strip().lstrip("+"):
            raise bad_request(f"logit_bias key {key!r} is invalid: allowed token ids (integers >= 0) as strings",
                              param="logit_bias")
        out[token_id] = bias
    return out


def guided_structured_outputs(req: _SamplingFields, response_format: dict | None = None) -> StructuredOutputs | None:
    """The output constraint of a request: response_format (chat) or vLLM's guided_* fields, at most one."""
    given = {name: value for name, value in (("guided_json", req.guided_json), ("guided_regex", req.guided_regex),
                                             ("guided_choice", req.guided_choice),
                                             ("guided_grammar", req.guided_grammar)) if value is not None}
    kind = (response_format or {}).get("type", "text")
    if kind != "text":
        given["response_format"] = response_format
    if len(given) > 1:
        raise bad_request(f"{' and '.join(given)} are both set: allowed one output constraint per request",
                          param=next(iter(given)))
    if not given:
        return None
    (field_name, value), = given.items()
    try:
        if field_name == "response_format":
            if kind == "json_object":
                return StructuredOutputs(json_object=True, field_name=field_name)
            schema = (value.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
            if not isinstance(schema, dict):
                raise ValueError(f"response_format={short_repr(value)} is invalid: allowed {{\"type\": \"text\"}}, "
                                 f"{{\"type\": \"json_object\"}} or {{\"type\": \"json_schema\", \"json_schema\": "
                                 f"{{\"name\": ..., \"schema\": {{...}}}}}}")
            return StructuredOutputs(json=schema, field_name=field_name)
        key = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
               "guided_grammar": "grammar"}[field_name]
        return StructuredOutputs(**{key: value}, field_name=field_name)
    except ValueError as exc:
        raise bad_request(str(exc), param=field_name) from None


def sampling_params(req: _SamplingFields, caps: ServerSettings, max_tokens: int | None, logprobs: int | None,
                    logprobs_field: str, structured: StructuredOutputs | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters for a request; APIError(400) naming the field when one is out of range."""
    _check_cap("n", req.n, 1, caps.max_n, "max_n")
    _check_cap(logprobs_field, logprobs, 0, caps.max_logprobs, "max_logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > caps.max_stop:
        raise bad_request(f"stop has {len(stop)} strings: allowed at most {caps.max_stop} on this server "
                          f"(server setting max_stop)", param="stop")
    for i, text in enumerate(stop):
        if isinstance(text, str) and len(text) > caps.max_stop_len:
            where = "stop" if isinstance(req.stop, str) else f"stop[{i}]"
            raise bad_request(f"{where} has {len(text)} characters: allowed at most {caps.max_stop_len} on this "
                              f"server (max_stop_len={caps.max_stop_len})", param="stop")
    if req.stop_token_ids is not None:
        check_stop_token_ids_count(len(req.stop_token_ids), caps)
    logit_bias = _logit_bias(req.logit_bias)
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request(f"best_of={req.best_of} is not supported: allowed only best_of = n ({req.n or 1}) or "
                          f"leave it out", param="best_of")
    fields = dict(n=req.n if req.n is not None else 1,
                  temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p,
                  top_k=-1 if req.top_k is None else req.top_k,
                  min_p=0.0 if req.min_p is None else req.min_p,
                  seed=req.seed,
                  presence_penalty=req.presence_penalty or 0.0,
                  frequency_penalty=req.frequency_penalty or 0.0,
                  repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                  max_tokens=max_tokens, min_tokens=req.min_tokens or 0, stop=stop,
                  stop_token_ids=list(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
                  logprobs=logprobs, logit_bias=logit_bias, allowed_token_ids=req.allowed_token_ids,
                  structured_outputs=structured, prompt_logprobs=prompt_logprobs,
                  skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens)
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        message = str(exc)
        param = param_of(message)
        if message.startswith("logit_bias"):
            param = "logit_bias"
        if param == "logprobs" and logprobs_field != "logprobs":
            message, param = message.replace("logprobs=", f"{logprobs_field}=", 1), logprobs_field
        raise bad_request(message, param=param) from None


def completion_params(req: CompletionRequest, caps: ServerSettings) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported by this server: remove it", param="suffix")
    _check_cap("prompt_logprobs", req.prompt_logprobs, 0, caps.max_logprobs, "max_logprobs")
    # echo with logprobs scores the prompt (lm-eval's log-likelihood): the engine computes prompt logprobs
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = req.logprobs
    return sampling_params(req, caps, echo_max_tokens(req), req.logprobs, "logprobs",
                           guided_structured_outputs(req), prompt_logprobs)


def echo_max_tokens(req: CompletionRequest) -> int | None:
    """max_tokens=0 with echo (score the prompt, generate nothing) runs one token that is then left out."""
    return 1 if req.echo and req.max_tokens == 0 else req.max_tokens


def chat_params(req: ChatCompletionRequest, caps: ServerSettings, tools: ToolPlan) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request(f"top_logprobs={req.top_logprobs} needs logprobs=true", param="top_logprobs")
    structured = guided_structured_outputs(req, req.response_format)
    tool_constraint = tools.structured_outputs()
    if tool_constraint is not None:
        if structured is not None:
            raise bad_request(f"tool_choice={req.tool_choice!r} constrains the output, and so does "
                              f"{structured.field_name}: allowed one", param="tool_choice")
        structured = tool_constraint
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return sampling_params(req, caps, max_tokens, logprobs, "top_logprobs", structured)


def check_num_seqs(num_prompts: int, n: int, caps: ServerSettings) -> None:
    """400 when prompts x n is more than one request may hold: max_seqs_per_request, or the whole queue
    (max_queued_requests), which such a request could never enter. Checked before anything is tokenized."""
    seqs = num_prompts * n
    limit, setting = min((caps.max_seqs_per_request, "max_seqs_per_request"),
                         (caps.max_queued_requests, "max_queued_requests"), key=lambda cap: cap[0])
    if seqs > limit:
        raise bad_request(f"{num_prompts} prompts x n={n} = {seqs} sequences: allowed at most {limit} per request "
                          f"on this server ({setting}={limit})", param="prompt" if num_prompts > 1 else "n")


PRECHECK_MIN_BYTES = 64 << 10


def check_stop_token_ids_count(count: int, caps: ServerSettings) -> None:
    if count > caps.max_stop_token_ids:
        raise bad_request(f"stop_token_ids has {count} ids: allowed at most {caps.max_stop_token_ids} on this "
                          f"server (max_stop_token_ids={caps.max_stop_token_ids})", param="stop_token_ids")


def precheck_sizes(raw: bytes, caps: ServerSettings) -> None:
    """The per-request caps on the raw JSON, before pydantic builds an object per item: a ~1 MB list of 250,000
    prompts, or 200,000 stop token ids, is refused in milliseconds instead of after a fraction of a second of
    validation that other requests wait behind. Bodies that are not a JSON object, or whose fields are malformed,
    are left to `parse_body` and its messages. Small bodies skip it: validating them costs less than parsing twice."""
    if len(raw) < PRECHECK_MIN_BYTES:
        return
    try:
        body = json.loads(raw)
    except ValueError:
        return
    if not isinstance(body, dict):
        return
    prompt, n = body.get("prompt"), body.get("n", 1)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and isinstance(n, int) and n >= 1:
        check_num_seqs(len(prompt), n, caps)
    stop_ids = body.get("stop_token_ids")
    if isinstance(stop_ids, list):
        check_stop_token_ids_count(len(stop_ids), caps)


def prompt_list(prompt: PromptInput) -> list[str | list[int]]:
    """The prompts of a completion request: one string or token-id list each. 400 for an empty one."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif not prompt:
        raise bad_request("prompt is empty: give a string, a list of strings, token ids or lists of token ids",
                          param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise bad_request(f"{where} is empty: give at least one character or token id", param="prompt")
    return prompts


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template expects them: role and text content."""
    if not messages:
        raise bad_request("messages is empty: give at least one {\"role\", \"content\"} message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role={m.role!r} is invalid: allowed {', '.join(CHAT_ROLES)}",
                              param="messages")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}].type={part.type!r} is not supported: this "
                                      f"server takes only text parts ({{\"type\": \"text\", \"text\": ...}})",
                                      param="messages")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out



def check_model(requested: str | None, served: tuple[str, ...]) -> None:
    if requested is not None and requested not in served:
        raise APIError(404, f"model={requested!r} does not exist on this server: it serves {served[0]!r} "
                            f"(GET /v1/models)", param="model", code="model_not_found")

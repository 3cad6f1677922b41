"""Tool calling on /v1/chat/completions: the tools rendered into the prompt, `tool_choice` turned into a constraint,
and the model's text parsed back into OpenAI's `tool_calls`.

Rendering: a chat template that reads `tools` gets them (as transformers passes them). Otherwise, SmolLM2's case,
the default format (docs/tool_calling.md) is used: a system message lists the functions as JSON schemas and asks
for each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes/Qwen convention that many
instruction-tuned models have seen); earlier assistant calls are written back the same way, and tool results are
`tool` messages.

`tool_choice`: "none" renders no tools and parses nothing; "auto" lets the model choose and parses any
`<tool_call>` blocks; "required" constrains the output to a JSON array of one or more {"name", "arguments"} calls,
and a named function constrains it to that function's arguments, so both always parse.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pernode.serve.sampling.structured.spec import StructuredOutputs
from pernode.serve.server.errors import bad_request

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)",
                              re.DOTALL)
DEFAULT_TOOL_PROMPT = (
    "You may call functions to answer. The functions are, as JSON schemas:\n{tools}\n"
    "To call one, reply with one line per call: " + TOOL_CALL_OPEN
    + '{{"name": <function name>, "arguments": <arguments as a JSON object>}}' + TOOL_CALL_CLOSE
    + "\nOtherwise answer in plain text.")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def to_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` and `tool_choice` mean for this request."""

    tools: tuple[Tool, ...]
    choice: str  # "none", "auto", "required" or "named"
    named: str | None = None  # the function for choice "named"

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def structured_outputs(self) -> StructuredOutputs | None:
        """The constraint that makes "required" and named choices always parse."""
        if self.choice == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return StructuredOutputs(json=tool.parameters, field_name="tools")
        if self.choice == "required":
            calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
            return StructuredOutputs(json={"type": "array", "minItems": 1, "items": {"anyOf": calls}},
                                     field_name="tools")
        return None


def plan_tools(tools: list | None, tool_choice: str | dict | None) -> ToolPlan:
    """Validate `tools` and `tool_choice`; 400 naming the field."""
    parsed = []
    for i, item in enumerate(tools or []):
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}] is invalid: allowed {{\"type\": \"function\", \"function\": {{\"name\", "
                              f"\"description\", \"parameters\"}}}}", param="tools")
        name, params = fn.get("name"), fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise bad_request(f"tools[{i}].function.name={name!r} is invalid: allowed 1-64 letters, digits, _ . -",
                              param="tools")
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters is invalid: allowed a JSON schema object",
                              param="tools")
        description = fn.get("description") or ""
        parsed.append(Tool(name, description if isinstance(description, str) else "", params))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise bad_request("tools has the same function name twice: allowed unique names", param="tools")
    if tool_choice is None:
        return ToolPlan(tuple(parsed), "auto" if parsed else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice={tool_choice!r} is invalid: allowed \"none\", \"auto\", \"required\" or "
                              f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", param="tool_choice")
        if tool_choice != "none" and not parsed:
            raise bad_request(f"tool_choice={tool_choice!r} needs tools: give at least one", param="tool_choice")
        return ToolPlan(tuple(parsed), tool_choice)
    fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise bad_request(f"tool_choice names function {name!r}, which is not in tools: allowed "
                          f"{', '.join(names) or 'none (no tools given)'}", param="tool_choice")
    return ToolPlan(tuple(parsed), "named", name)


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def _call_text(name: str, arguments) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + TOOL_CALL_CLOSE


def render_messages(messages: list[dict], raw_messages: list, plan: ToolPlan, native: bool) -> list[dict]:
    """The conversation for the chat template: assistant tool calls and tool results written in the default
    format, and (unless the template renders tools itself) a system message listing the tools."""
    out = []
    for message, raw in zip(messages, raw_messages):
        message = dict(message)
        calls = getattr(raw, "tool_calls", None) or []
        if calls and not native:
            texts = [_call_text((c.get("function") or {}).get("name", ""), (c.get("function") or {}).get("arguments"))
                     for c in calls if isinstance(c, dict)]
            message["content"] = "\n".join(filter(None, [message.get("content") or ""] + texts))
        elif calls:
            message["tool_calls"] = calls
        if getattr(raw, "tool_call_id", None) is not None:
            message["tool_call_id"] = raw.tool_call_id
        out.append(message)
    if plan.active and not native:
        listing = "\n".join(json.dumps(t.to_openai()["function"], ensure_ascii=False) for t in plan.tools)
        prompt = DEFAULT_TOOL_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + prompt).strip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from the model's text under `plan`; text that is not a call stays content."""
    if not plan.active:
        return text, []
    if plan.choice == "named":
        return None, [_call(plan.named, text)]
    if plan.choice == "required":
        try:
            items = json.loads(text)
        except ValueError:  # cut short by max_tokens
            return text, []
        return None, [_call(c["name"], c["arguments"]) for c in items if isinstance(c, dict) and "name" in c]
    names = {t.name for t in plan.tools}
    calls, spans = [], []
    for m in _TOOL_CALL_BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
            spans.append(m.span())
    if not calls:
        return text, []
    content = "".join(text[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)]))
    return content.strip() or None, calls

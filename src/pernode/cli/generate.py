"""`pernode generate` and `pernode chat`: the engine answering, streamed to the terminal."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from pernode.cli.options import (add_engine_arguments, add_sampling_arguments, engine_config_from_args,
                                 sampling_params_from_args)
from pernode.serve.engine.llm_engine import LLMEngine


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation of a prompt, streaming")
    p.add_argument("prompt")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn")
    add_engine_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(p)
    add_sampling_arguments(p)
    p.set_defaults(func=run_chat)


def _stream(engine: LLMEngine, request_id: str, prompt, params) -> str:
    engine.add_request(request_id, prompt, params)
    pieces = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].delta_text)
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


def run_generate(args: argparse.Namespace) -> int:
    engine = LLMEngine(engine_config_from_args(args))
    prompt = args.prompt
    if args.chat_template:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(engine, "generate", prompt, sampling_params_from_args(args))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    console = Console()
    engine = LLMEngine(engine_config_from_args(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    console.print("[dim]chat with the model; an empty line or Ctrl-D ends[/dim]")
    turn = 0
    while True:
        try:
            user = console.input("[bold]you> [/bold]")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        console.print("[bold]model> [/bold]", end="")
        reply = _stream(engine, f"chat-{turn}", prompt, sampling_params_from_args(args))
        messages.append({"role": "assistant", "content": reply})
        turn += 1
    return 0

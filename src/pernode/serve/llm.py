"""The offline API in the shape vLLM users know: `LLM(model=...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
import logging
from typing import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from pernode.config import DEFAULT_MODEL, EngineConfig
from pernode.progress import progress
from pernode.serve.engine.llm_engine import LLMEngine
from pernode.serve.engine.outputs import CompletionOutput, FinishReason, RequestOutput
from pernode.serve.sampling.params import SamplingParams

log = logging.getLogger("pernode")

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options):
        self._attach(LLMEngine(EngineConfig(model=model, **engine_options)))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run all prompts to completion, batched continuously; outputs in prompt order. A prompt that is
        invalid (too long, empty, bad token ids) gets an output with `error` set; the others still run."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts: "
                             "give one, or one per prompt")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, params in zip(prompts, sampling_params):
            request_id = f"llm-{next(self._ids)}"
            order.append(request_id)
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as exc:
                log.warning("request %s rejected: %s", request_id, exc)
                results[request_id] = RequestOutput(
                    request_id, prompt if isinstance(prompt, str) else None,
                    [] if isinstance(prompt, str) else list(prompt),
                    [CompletionOutput(0, "", [], finish_reason=FinishReason.ERROR)], finished=True, error=str(exc))
        with progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not use_tqdm, transient=True) as bar:
            task = bar.add_task("generating", total=len(order))
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.advance(task)
        return [results[i] for i in order]

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes (LLMEngine.reset_prefix_cache): later prompts prefill as on a fresh engine."""
        return self.engine.reset_prefix_cache()

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate the assistant's reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

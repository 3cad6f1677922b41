"""Whether a request is done after the token just appended, by the rules that need no text: eos, stop token ids,
max_tokens and the context length. Stop strings need the text: the output processor applies them."""
from __future__ import annotations

from pernode.serve.engine.outputs import FinishReason
from pernode.serve.engine.request import Request


def check_stop(request: Request, max_model_len: int) -> FinishReason | None:
    """STOP for eos or a stop token id (once past min_tokens; a stop token id is recorded as the request's
    `stop_reason`), LENGTH at max_tokens or max_model_len, else None. Token rules win over length."""
    params = request.params
    token_id = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if token_id in request.eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_id_set:  # a set: O(1) per token however long the list
            request.stop_reason = token_id
            return FinishReason.STOP
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return FinishReason.LENGTH
    if request.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None

"""What OpenAI's chat and text completions write alike: usage, logprobs, sampling fields, the stream's end.

Responses are built as dicts and serialized with orjson (no pydantic on the hot path); `wire.py`
documents their shapes for the OpenAPI page.
"""

from __future__ import annotations

import math
from typing import Any

from server.engine.interface import TokenLogprob
from server.pipeline.events import Usage
from server.pipeline.request import Sampling
from server.protocols.openai.wire import _GenerationRequest

SSE_DONE = b"data: [DONE]\n\n"


def sampling_of(request: _GenerationRequest) -> Sampling:
    """The sampling fields chat and text completions share, in the pipeline's terms."""
    return Sampling(
        n=request.n,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
        stop=request.stop_sequences,
        stop_token_ids=list(request.stop_token_ids or ()),
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        logit_bias=request.logit_bias_ids,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
    )


def usage_dict(usage: Usage) -> dict[str, Any]:
    completion = usage.completion_tokens
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": usage.prompt_tokens + completion,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "image_tokens": usage.image_tokens,
            "text_tokens": usage.prompt_tokens - usage.image_tokens,
        },
    }


def _finite(value: float) -> float:
    # JSON has no -Infinity; OpenAI reports impossible tokens as -9999.0.
    return value if value > -9999.0 else -9999.0


def logprobs_content(entries: list[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: one entry per generated token with its `top_n` alternatives."""
    content = []
    for entry in entries:
        top = [
            {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}
            for _id, token, logprob in entry.top[:top_n]
        ]
        content.append(
            {
                "token": entry.token,
                "logprob": _finite(entry.logprob),
                "bytes": list(entry.token.encode()),
                "top_logprobs": top,
            }
        )
    return content


def completion_logprobs(
    entries: list[TokenLogprob | None], top_n: int, text_offset: int, zero_width: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The legacy completions `logprobs`: parallel lists, top alternatives as {token: logprob}.

    As in OpenAI's (and vLLM's) completions, `top_logprobs` has the `top_n` most likely tokens and the
    chosen one. An entry without a logprob (`None`, or NaN: the first prompt token, with `echo`) has
    null there. `text_offset` is each token's position in the returned text; tokens in `zero_width`
    (special tokens left out of the text) take no room.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        offsets.append(text_offset)
        if entry is None or math.isnan(entry.logprob):
            tokens.append(entry.token if entry is not None else "")
            token_logprobs.append(None)
            top_logprobs.append(None)
            if entry is not None and entry.token not in zero_width:
                text_offset += len(entry.token)
            continue
        tokens.append(entry.token)
        token_logprobs.append(_finite(entry.logprob))
        top = {token: _finite(logprob) for _id, token, logprob in entry.top[:top_n]}
        top.setdefault(entry.token, _finite(entry.logprob))
        top_logprobs.append(top)
        if entry.token not in zero_width:
            text_offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

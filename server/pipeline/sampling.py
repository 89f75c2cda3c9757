"""One request's sampling fields -> the engine's `SamplingOptions`, with the checks that need the prompt or vocabulary.

Shared by every protocol. The protocol adapter has already bounded every field on its own; this adds
what depends on the model: the context length (a 400 `context_length_exceeded` before any
generation), and token ids that must exist in the vocabulary.
"""

from __future__ import annotations

from typing import Any

from server.engine.interface import SamplingOptions
from server.errors import BadRequestError, ContextLengthExceededError
from server.pipeline.request import Output, Sampling

GREEDY_TEMPERATURE = 1e-5  # vLLM decodes greedily below this and then refuses n > 1


def is_greedy(sampling: Sampling) -> bool:
    return sampling.temperature is not None and sampling.temperature < GREEDY_TEMPERATURE


def max_tokens_for(
    *,
    requested: int | None,
    requested_param: str,
    prompt_tokens: int,
    image_tokens: int,
    max_model_len: int,
    default_max_tokens: int | None,
    prompt_param: str,
    max_tokens_cap: int | None = None,
) -> int:
    """The completion budget; a 400 when the prompt plus the request cannot fit the context.

    `max_tokens_cap` (the operator's): a larger request is clamped to it, so the answer ends at the
    cap with the protocol's "length" reason; a request without a limit gets at most the cap too."""
    if max_tokens_cap is not None:
        requested = min(requested, max_tokens_cap) if requested is not None else None
        default_max_tokens = min(default_max_tokens or max_tokens_cap, max_tokens_cap)
    if requested is not None and requested >= max_model_len:
        raise BadRequestError(
            f"{requested_param} is too large: {requested}. This model's maximum context length is "
            f"{max_model_len} tokens (prompt and completion together).",
            param=requested_param,
            code="invalid_value",
        )
    room = max_model_len - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        images = f" ({image_tokens} of them for images)" if image_tokens else ""
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. The prompt has "
            f"{prompt_tokens} tokens{images} and {requested or 1} completion tokens were requested "
            f"({prompt_tokens + (requested or 1)} in all).",
            param=prompt_param,
        )
    if requested is not None:
        return requested
    return min(room, default_max_tokens or room)


def check_token_ids(ids: Any, vocab_size: int, param: str) -> None:
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        raise BadRequestError(
            f"token id(s) {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})", param=param, code="invalid_value"
        )


def sampling_options(
    sampling: Sampling,
    output: Output,
    *,
    max_tokens: int,
    vocab_size: int,
    n: int,
    json_schema: dict[str, Any] | None = None,
    json_object: bool = False,
) -> SamplingOptions:
    """`n`: choices of this one engine request (the pipeline runs n greedy choices as n requests)."""
    if sampling.min_tokens > max_tokens:
        raise BadRequestError(
            f"min_tokens ({sampling.min_tokens}) is larger than the completion budget ({max_tokens})",
            param="min_tokens",
            code="invalid_value",
        )
    if sampling.logit_bias:
        check_token_ids(sampling.logit_bias, vocab_size, "logit_bias")
    if sampling.stop_token_ids:
        check_token_ids(sampling.stop_token_ids, vocab_size, "stop_token_ids")
    return SamplingOptions(
        max_tokens=max_tokens,
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        logprobs=output.logprobs,
        prompt_logprobs=output.prompt_logprobs,
        logit_bias=sampling.logit_bias,
        skip_special_tokens=sampling.skip_special_tokens,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        json_schema=json_schema,
        json_object=json_object,
        stream=output.stream,
    )

"""`POST /tokenize` and `POST /detokenize` (request and response shapes as vLLM's).

`/tokenize` with `prompt` tokenizes raw text as `/v1/completions` would; with `messages` (and
optional `tools`) it builds the chat prompt exactly as `/v1/chat/completions` would, through the
pipeline's `prepare_chat`: normalization, the chat template, the images fetched and run through the
engine's multimodal processor, so the count includes every image token (pan-and-scan crops too). It
is a dry run of a chat request's prompt: no generation, no admission slot. What normalization
changed is in `X-Gemma-Normalized`.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from server.errors import BadRequestError
from server.pipeline.normalize import NORMALIZED_HEADER
from server.pipeline.pipeline import Pipeline
from server.pipeline.request import ChatInput
from server.pipeline.tools import plan_tools
from server.protocols.openai.chat import tools_of, turns_of
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import DetokenizeRequest, TokenizeRequest


async def tokenize(body: TokenizeRequest, pipeline: Pipeline, http: Request) -> Response:
    check_request_fields(body)
    pipeline.resolve_model(body.model, http)  # an adapter shares the base model's tokenizer
    headers: dict[str, str] = {}
    image_tokens = 0
    if body.messages is None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = pipeline.tokenize_text(body.prompt or "", add_special_tokens=add_special)
    else:
        if body.add_special_tokens:
            raise BadRequestError(
                "add_special_tokens is only for `prompt`: the chat template writes <bos> itself",
                param="add_special_tokens",
            )
        chat = ChatInput(turns_of(body.messages), tools_of(body.tools, None), body.add_generation_prompt)
        prompt = await pipeline.prepare_chat(chat, plan_tools(chat.tools))
        tokens, image_tokens = prompt.token_ids, prompt.prepared.num_image_tokens
        if prompt.changes:
            headers = {NORMALIZED_HEADER: ",".join(prompt.changes)}
    answer: dict[str, Any] = {
        "count": len(tokens),
        "max_model_len": pipeline.engine.max_model_len,
        "tokens": tokens,
        "image_tokens": image_tokens,
    }
    if body.return_token_strs:
        answer["token_strs"] = pipeline.tokenizer.convert_ids_to_tokens(tokens)
    return Response(orjson.dumps(answer), media_type="application/json", headers=headers)


async def detokenize(body: DetokenizeRequest, pipeline: Pipeline, http: Request) -> Response:
    check_request_fields(body)
    pipeline.resolve_model(body.model, http)
    text = pipeline.detokenize(body.tokens, "tokens")
    return Response(orjson.dumps({"prompt": text}), media_type="application/json")

"""Serving logic of `POST /tokenize` and `POST /detokenize` (request and response shapes as vLLM's).

`/tokenize` with `prompt` tokenizes raw text as `/v1/completions` would; with `messages` (and
optional `tools`) it builds the chat prompt exactly as `/v1/chat/completions` would: normalization,
the chat template, the images fetched and run through the engine's multimodal processor, so the
count includes every image token (pan-and-scan crops too). It is a dry run of a chat request's
prompt: no generation, no engine slot. What normalization changed is in `X-Gemma-Normalized`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from server.chat import ChatService, check_model, normalization_headers
from server.errors import BadRequestError
from server.pipeline.sampling import check_token_ids
from server.pipeline.tools import plan_tools
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import DetokenizeRequest, TokenizeRequest


class TokenizationService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.engine = chat.engine
        self.runner = chat.runner

    async def tokenize(self, request: TokenizeRequest) -> Response:
        check_model(self.engine, request.model)
        check_request_fields(request)
        tokenizer = self.engine.tokenizer
        headers: dict[str, str] = {}
        image_tokens = 0
        if request.messages is None:
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            tokens = list(tokenizer.encode(request.prompt or "", add_special_tokens=add_special))
        else:
            if request.add_special_tokens:
                raise BadRequestError(
                    "add_special_tokens is only for `prompt`: the chat template writes <bos> itself",
                    param="add_special_tokens",
                )
            plan = plan_tools(request.tools, "auto" if request.tools else None)
            conversation = self.chat.conversation(request.messages, plan)
            prepared = await self.chat.prepare(conversation, add_generation_prompt=request.add_generation_prompt)
            tokens, image_tokens = prepared.token_ids, prepared.num_image_tokens
            headers = normalization_headers(conversation)
        body: dict[str, Any] = {
            "count": len(tokens),
            "max_model_len": self.engine.max_model_len,
            "tokens": tokens,
            "image_tokens": image_tokens,
        }
        if request.return_token_strs:
            body["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    async def detokenize(self, request: DetokenizeRequest) -> Response:
        check_model(self.engine, request.model)
        check_request_fields(request)
        check_token_ids(request.tokens, self.runner.vocab_size, "tokens")
        text = self.engine.tokenizer.decode(request.tokens)
        return Response(orjson.dumps({"prompt": text}), media_type="application/json")

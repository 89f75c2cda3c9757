"""From a conversation's turns to Gemma 3's prompt, using the model's own chat template.

`conversation_for_template` normalizes the validated messages (`normalize.py`: system folding,
merged turns, tool results) into the structure Gemma 3's template reads (text parts, and
`{"type": "image"}` placeholders where the images go) and collects the image references in prompt
order. `render_prompt` renders the checkpoint's template (transformers renders it in a sandboxed
Jinja environment) and tokenizes the result. The images themselves are expanded into Gemma's
`<start_of_image>` + soft tokens by vLLM's multimodal processor, not here.

No string pasting of special tokens happens in this module: the template owns the layout.
"""

from __future__ import annotations

from typing import Any

import jinja2

from server.errors import BadRequestError
from server.pipeline.normalize import Conversation, normalize
from server.pipeline.request import Turn

__all__ = ["Conversation", "conversation_for_template", "render_prompt"]


def conversation_for_template(
    messages: list[Turn], *, tools_text: str | None = None, strict: bool = False
) -> Conversation:
    return normalize(messages, tools_text=tools_text, strict=strict)


def render_prompt(
    tokenizer: Any, conversation: Conversation, *, add_generation_prompt: bool = True
) -> tuple[str, list[int]]:
    """Renders the model's chat template (with a generation prompt by default), and tokenizes it.

    The template writes `<bos>` itself, so the tokenizer must not add special tokens again.
    """
    try:
        text = tokenizer.apply_chat_template(
            conversation.messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as exc:
        # Normalization makes roles alternate; this is a last line of defence.
        raise BadRequestError(
            f"the conversation does not fit the model's chat format: {exc}", param="messages"
        ) from exc
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    return text, token_ids

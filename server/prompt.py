"""From OpenAI chat messages to Gemma 3's prompt, using the model's own chat template.

`conversation_for_template` turns validated messages into the structure Gemma 3's template reads
(text parts, and `{"type": "image"}` placeholders where the images go) and collects the image
references in prompt order. `render_prompt` renders the checkpoint's template (transformers renders
it in a sandboxed Jinja environment) and tokenizes the result. The images themselves are expanded
into Gemma's `<start_of_image>` + soft tokens by vLLM's multimodal processor, not here.

No string pasting of special tokens happens in this module: the template owns the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2

from server.errors import BadRequestError
from server.protocol import AssistantMessage, ImagePart, SystemMessage, TextPart, ToolMessage, UserMessage

Message = SystemMessage | UserMessage | AssistantMessage | ToolMessage


@dataclass(slots=True)
class ImageRef:
    url: str
    detail: str
    param: str  # where it was in the request, e.g. "messages[1].content[2].image_url"


@dataclass(slots=True)
class Conversation:
    messages: list[dict[str, Any]]
    images: list[ImageRef]


def conversation_for_template(messages: list[Message]) -> Conversation:
    template_messages: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if isinstance(message, ToolMessage) or (isinstance(message, AssistantMessage) and message.tool_calls):
            raise BadRequestError("tool messages and tool calls are not supported yet", param=param)
        role = "system" if isinstance(message, SystemMessage) else message.role
        content = message.content
        if content is None:
            content = ""
        if isinstance(content, str):
            template_messages.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part_index, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                if role != "user":
                    raise BadRequestError(
                        "images are only allowed in user messages", param=f"{param}.content[{part_index}]"
                    )
                images.append(
                    ImageRef(
                        url=part.image_url.url,
                        detail=part.image_url.detail,
                        param=f"{param}.content[{part_index}].image_url",
                    )
                )
                parts.append({"type": "image"})
        template_messages.append({"role": role, "content": parts})
    return Conversation(messages=template_messages, images=images)


def render_prompt(tokenizer: Any, conversation: Conversation) -> tuple[str, list[int]]:
    """Renders the model's chat template with a generation prompt, and tokenizes it.

    The template writes `<bos>` itself, so the tokenizer must not add special tokens again.
    """
    try:
        text = tokenizer.apply_chat_template(conversation.messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        # Gemma 3's template raises for roles that do not alternate user/model.
        raise BadRequestError(
            f"the conversation does not fit the model's chat format: {exc}", param="messages"
        ) from exc
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    return text, token_ids

"""Gemma 3 message normalization: any protocol's turns -> the conversation Gemma 3's template accepts.

Gemma 3 has no system role and its chat template insists on turns that alternate user/model, starting
with a user turn. Clients send system and developer messages anywhere, consecutive user messages,
tool results and assistant tool calls (`server.pipeline.request.Turn`s, whatever their protocol).
This module turns any such list into a conversation the template renders, and records every change
so the response can say what was done (header `X-Gemma-Normalized`, see `NORMALIZED_HEADER`):

- `system-folded`: the system text goes into the first user turn, exactly as Gemma 3's template does
  it (system text + "\\n\\n" + the user's text). The template still does the folding; this module
  only hands it one leading system message.
- `developer-as-system`: `developer` messages are system messages.
- `systems-merged` / `system-moved`: several system messages are joined with "\\n\\n"; one that came
  after the conversation started is moved to the front.
- `tools-rendered`, `tool-calls-rendered`, `tool-results-folded`: tool definitions join the system
  text, assistant tool calls become the model's text, `tool` results become user turns
  (`server/pipeline/tools.py` owns their text).
- `merged-user-turns` / `merged-assistant-turns`: consecutive turns of one role become one turn; their
  texts are joined with "\\n\\n", images keep their places.
- `user-turn-inserted`: an empty user turn is put first when the conversation starts with the model
  or has no turn at all (a system message alone would otherwise vanish from the prompt).

With `strict` (setting `server.strict_messages`), the repairs (`REPAIRS`) are refused with a 400
instead. Image order is prompt order: images are collected in message order, and nothing here
reorders turns that hold images (system messages carry only text).

This module does no tokenization and places no special tokens: the template owns the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.errors import BadRequestError
from server.pipeline.request import Image, Part, Text, Turn
from server.pipeline.tools import render_tool_calls, render_tool_result

NORMALIZED_HEADER = "X-Gemma-Normalized"

SYSTEM_FOLDED = "system-folded"
DEVELOPER_AS_SYSTEM = "developer-as-system"
SYSTEMS_MERGED = "systems-merged"
SYSTEM_MOVED = "system-moved"
TOOLS_RENDERED = "tools-rendered"
TOOL_CALLS_RENDERED = "tool-calls-rendered"
TOOL_RESULTS_FOLDED = "tool-results-folded"
MERGED_USER_TURNS = "merged-user-turns"
MERGED_ASSISTANT_TURNS = "merged-assistant-turns"
USER_TURN_INSERTED = "user-turn-inserted"

# Changes that repair a conversation Gemma's format does not allow; strict mode refuses them.
REPAIRS = (SYSTEMS_MERGED, SYSTEM_MOVED, MERGED_USER_TURNS, MERGED_ASSISTANT_TURNS, USER_TURN_INSERTED)


@dataclass(slots=True)
class Conversation:
    """What the chat template renders, the images in prompt order, and what normalization changed."""

    messages: list[dict[str, Any]]
    images: list[Image]
    changes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Turn:
    role: str  # "user" or "assistant"
    content: str | list[dict[str, Any]]  # the template's form: a string or text/image parts
    origin: str  # "user", "assistant" or "tool"


def normalize(messages: list[Turn], *, tools_text: str | None = None, strict: bool = False) -> Conversation:
    changes: list[str] = []
    images: list[Image] = []
    system_texts: list[str] = []
    turns: list[_Turn] = []
    call_names: dict[str, str] = {}

    def note(change: str) -> None:
        if change not in changes:
            changes.append(change)

    for message in messages:
        if message.role in ("system", "developer"):
            if message.role == "developer":
                note(DEVELOPER_AS_SYSTEM)
            if turns:
                note(SYSTEM_MOVED)
            system_texts.append(_joined_text(message.content))
        elif message.role == "user":
            turns.append(_Turn("user", _user_content(message.content, images), "user"))
        elif message.role == "assistant":
            turns.append(_Turn("assistant", _assistant_content(message, call_names, note), "assistant"))
        else:
            call_id = message.tool_call_id or ""
            name = message.name or call_names.get(call_id) or call_id
            turns.append(_Turn("user", render_tool_result(name, _joined_text(message.content)), "tool"))
            note(TOOL_RESULTS_FOLDED)

    merged = _merge_turns(turns, note)
    if not merged or merged[0].role != "user":
        merged.insert(0, _Turn("user", "", "user"))
        note(USER_TURN_INSERTED)
    if len(system_texts) > 1:
        note(SYSTEMS_MERGED)
    if tools_text:
        system_texts.append(tools_text)
        note(TOOLS_RENDERED)
    template_messages: list[dict[str, Any]] = []
    if system_texts:
        note(SYSTEM_FOLDED)
        template_messages.append({"role": "system", "content": "\n\n".join(system_texts)})
    template_messages.extend({"role": turn.role, "content": turn.content} for turn in merged)

    if strict:
        repairs = [change for change in changes if change in REPAIRS]
        if repairs:
            raise BadRequestError(
                "the conversation does not fit Gemma 3's format (one optional leading system message, then "
                f"user and assistant turns alternating, starting with user); it would need: {', '.join(repairs)}. "
                "This server runs with strict_messages, so it refuses instead of repairing.",
                param="messages",
                code="invalid_conversation",
            )
    return Conversation(messages=template_messages, images=images, changes=changes)


def _joined_text(content: str | list[Part] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n\n".join(part.text for part in content if isinstance(part, Text))


def _user_content(content: str | list[Part] | None, images: list[Image]) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, Text):
            parts.append({"type": "text", "text": part.text})
        else:
            images.append(part)
            parts.append({"type": "image"})
    return parts


def _assistant_content(message: Turn, call_names: dict[str, str], note: Any) -> Any:
    content = message.content
    if not message.tool_calls:
        if content is None:
            return ""
        return (
            content
            if isinstance(content, str)
            else [{"type": "text", "text": p.text} for p in content if isinstance(p, Text)]
        )
    for call in message.tool_calls:
        call_names[call.id] = call.name
    note(TOOL_CALLS_RENDERED)
    text = _joined_text(content) if content is not None else ""
    rendered = render_tool_calls(message.tool_calls)
    return f"{text.rstrip()}\n{rendered}" if text.strip() else rendered


def _merge_turns(turns: list[_Turn], note: Any) -> list[_Turn]:
    merged: list[_Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            previous = merged[-1]
            if previous.origin == turn.origin == "user":
                note(MERGED_USER_TURNS)
            elif turn.role == "assistant":
                note(MERGED_ASSISTANT_TURNS)
            # tool results following each other (or a user turn) are part of folding tool results
            origin = "user" if "user" in (previous.origin, turn.origin) else previous.origin
            merged[-1] = _Turn(turn.role, _merge_content(previous.content, turn.content), origin)
        else:
            merged.append(turn)
    return merged


def _merge_content(first: Any, second: Any) -> Any:
    if isinstance(first, str) and isinstance(second, str):
        return _join(first, second)
    a, b = _as_parts(first), _as_parts(second)
    if not a or not b:
        return a or b
    # The template trims each text part and writes parts back to back: the "\n\n" between two turns
    # must be inside one text part to survive.
    if a[-1]["type"] == "text" and b[0]["type"] == "text":
        return [*a[:-1], {"type": "text", "text": _join(a[-1]["text"], b[0]["text"])}, *b[1:]]
    return [*a, *b]


def _as_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def _join(first: str, second: str) -> str:
    if not first.strip():
        return second
    if not second.strip():
        return first
    return f"{first.rstrip()}\n\n{second.lstrip()}"

"""Server-sent events with a name: the frame Anthropic's and the Responses API's streams are made of.

Each event is `event: <kind>` and `data: <JSON>` lines, then a blank line; the kind equals the data's
`type` in both protocols. (OpenAI's chat stream sends `data:` lines only: see `openai/chat.py`.)
"""

from __future__ import annotations

from typing import Any

import orjson


def named_event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

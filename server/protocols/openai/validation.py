"""Turns pydantic/FastAPI validation errors into one OpenAI-shaped 400.

FastAPI answers 422 with a list of every problem; OpenAI's SDKs expect a 400 whose `param` names the
offending field. We report the first problem (with a count of the others), so the body stays small
even for a request with thousands of errors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from server.errors import BadRequestError
from server.protocols.openai.wire import IGNORED_OPENAI_FIELDS, REFUSED_OPENAI_FIELDS

log = logging.getLogger(__name__)

# Messages for the error types a client most often meets, clearer than pydantic's defaults.
_FRIENDLY = {
    "json_invalid": "the request body is not valid JSON",
    "missing": "this field is required",
    "union_tag_invalid": "unsupported type",
    "union_tag_not_found": "a `type` (or `role`) field is required",
    "finite_number": "must be a finite number (NaN and Infinity are not allowed)",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
}


def param_from_location(location: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "content", 1, "image_url") -> "messages[0].content[1].image_url"."""
    parts = [p for p in location if p != "body"]
    # Drop pydantic's union/tag markers such as "user" or "str" that are not in the request.
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or None


def validation_error_to_api_error(errors: Sequence[dict[str, Any]]) -> BadRequestError:
    if not errors:
        return BadRequestError("invalid request")
    # With unions (content: str | list[...]) pydantic reports one error per alternative; the
    # deepest location is the most specific ("content[1]: unsupported type"), not "not a string".
    first = max(errors[:100], key=lambda e: len(e.get("loc", ())))
    location = tuple(first.get("loc", ()))
    param = param_from_location(_without_union_members(location))
    kind = first.get("type", "")
    message = _FRIENDLY.get(kind) or first.get("msg", "invalid value")
    if kind == "union_tag_invalid":
        context = first.get("ctx") or {}
        tag = context.get("tag")
        expected = context.get("expected_tags")
        message = f"unsupported type {tag!r}; expected one of {expected}"
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind == "json_invalid":
        param = None
    elif location == ("body",) and kind != "value_error":
        message = "the request body must be a JSON object"
    text = f"{param}: {message}" if param else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return BadRequestError(
        text, param=param, code="invalid_value" if kind != "missing" else "missing_required_parameter"
    )


def _without_union_members(location: tuple[Any, ...]) -> tuple[Any, ...]:
    """Removes the names pydantic inserts for union members ("user", "str", "NamedToolChoice", ...).

    Request fields are snake_case; anything else in a location (type names, literal[...]) is pydantic's.
    """
    cleaned: list[Any] = []
    for index, part in enumerate(location):
        previous = location[index - 1] if index else None
        if isinstance(part, str) and (
            part in _UNION_MEMBER_NAMES
            or not _FIELD_NAME.fullmatch(part)
            or (isinstance(previous, int) and part in _PART_TAGS)
        ):
            continue
        cleaned.append(part)
    return tuple(cleaned)


_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "list", "dict"}
_PART_TAGS = {"text", "image_url", "system", "developer", "user", "assistant", "tool"}
_logged_ignored_fields: set[str] = set()


def check_request_fields(request: BaseModel) -> list[str]:
    """Applies the policy on unknown top-level fields (see `wire.py`).

    Returns the OpenAI fields that are accepted and ignored; raises a 400 naming any other unknown
    field, and for the OpenAI fields this server refuses.
    """
    extra = request.model_extra or {}
    ignored: list[str] = []
    for name, value in extra.items():
        if name in IGNORED_OPENAI_FIELDS or (name in REFUSED_OPENAI_FIELDS and value is None):
            ignored.append(name)
            if name not in _logged_ignored_fields:
                _logged_ignored_fields.add(name)
                log.info("ignoring the OpenAI request field %r (no meaning for this server)", name)
        elif name in REFUSED_OPENAI_FIELDS:
            raise BadRequestError(REFUSED_OPENAI_FIELDS[name], param=name, code="unsupported_parameter")
        else:
            raise BadRequestError(
                f"Unrecognized request argument supplied: {name[:64]}", param=name[:64], code="unknown_parameter"
            )
    return ignored

"""What every protocol does with a body that fails validation: one 400 naming the field, and the unknown-field policy.

FastAPI answers 422 with a list of every problem; the OpenAI and Anthropic SDKs expect a 400 whose
message (and, for OpenAI, `param`) names the offending field. We report the first problem (with a
count of the others), so the body stays small even for a request with thousands of errors; the
error module writes it in the shape of the protocol the path belongs to.

`check_unknown_fields` applies a protocol's policy on unknown top-level fields: those it lists as
meaningless here are accepted, logged once and ignored; those it refuses get a 400 with the reason;
any other is a 400 naming it (a typo such as `max_token` must not silently change the request).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from server.errors import BadRequestError

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
_PART_TAGS = {
    *("text", "image_url", "system", "developer", "user", "assistant", "tool"),  # OpenAI
    *("image", "tool_use", "tool_result", "thinking", "redacted_thinking", "base64", "url"),  # Anthropic
}
_logged_ignored_fields: set[tuple[str, str]] = set()


def check_unknown_fields(
    request: BaseModel, *, ignored: frozenset[str], refused: dict[str, str], protocol: str
) -> list[str]:
    """Returns the unknown top-level fields that are accepted and ignored; raises a 400 naming any
    other, and for the fields the protocol refuses (a refused field sent as null is ignored)."""
    extra = request.model_extra or {}
    accepted: list[str] = []
    for name, value in extra.items():
        if name in ignored or (name in refused and value is None):
            accepted.append(name)
            if (protocol, name) not in _logged_ignored_fields:
                _logged_ignored_fields.add((protocol, name))
                log.info("ignoring the %s request field %r (no meaning for this server)", protocol, name)
        elif name in refused:
            raise BadRequestError(refused[name], param=name, code="unsupported_parameter")
        else:
            raise BadRequestError(
                f"Unrecognized request argument supplied: {name[:64]}", param=name[:64], code="unknown_parameter"
            )
    return accepted

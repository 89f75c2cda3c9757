"""OpenAI's policy on unknown top-level request fields (the fields are listed in `wire.py`)."""

from __future__ import annotations

from pydantic import BaseModel

from server.protocols.openai.wire import IGNORED_OPENAI_FIELDS, REFUSED_OPENAI_FIELDS
from server.protocols.validation import check_unknown_fields


def check_request_fields(request: BaseModel) -> list[str]:
    """Returns the OpenAI fields that are accepted and ignored; raises a 400 naming any other unknown
    field, and for the OpenAI fields this server refuses."""
    return check_unknown_fields(
        request, ignored=IGNORED_OPENAI_FIELDS, refused=REFUSED_OPENAI_FIELDS, protocol="OpenAI"
    )

"""What every protocol's wire types share: unknown fields kept in nested objects, no NaN/Infinity, checked JSON Schemas.

This module imports neither vLLM nor FastAPI.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import jsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_JSON_CHARS = 200_000


class _Wire(BaseModel):
    # Unknown fields are kept (and ignored) in nested objects; see the module docstring for the top level.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _no_non_finite_extras(self) -> Any:
        # Python's JSON parser reads NaN and Infinity; declared fields refuse them (allow_inf_nan),
        # and so do the ignored unknown ones: such a body is not JSON.
        for name, value in (self.__pydantic_extra__ or {}).items():
            if not _all_finite(value):
                raise ValueError(f"{name}: must be a finite number (NaN and Infinity are not allowed)")
        return self


def _all_finite(value: Any, depth: int = 0) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 64:
        return True
    if isinstance(value, dict):
        return all(_all_finite(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        return all(_all_finite(item, depth + 1) for item in value)
    return True


def check_json_schema(schema: Any) -> dict[str, Any]:
    """A JSON Schema a client sent (response_format, tool parameters): bounded and well-formed.

    A malformed tool schema crashed a vLLM worker once (CVE-2025-48944): schemas are checked here,
    before anything compiles them.
    """
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    if _depth(schema, 0) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        location = "/".join(str(p) for p in exc.absolute_path)
        raise ValueError(f"not a valid JSON Schema at '{location or '/'}': {exc.message[:200]}") from None
    except RecursionError:
        raise ValueError("the schema is nested too deeply") from None
    return schema


def _depth(value: Any, level: int) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


# A JSON Schema field of any protocol (tool parameters, output formats), checked by `check_json_schema`.
JsonSchema = Annotated[dict[str, Any], AfterValidator(check_json_schema)]

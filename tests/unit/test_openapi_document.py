"""The committed OpenAPI document (docs/openapi.json) is what the code serves: no drift."""

from __future__ import annotations

import json

from server.openapi import DOCUMENT, openapi_document, rendered


def test_the_committed_document_is_current() -> None:
    assert DOCUMENT.read_text() == rendered(), "the wire types or routes changed: run `make openapi`"


def test_every_generation_route_is_documented_with_its_error_shape() -> None:
    document = openapi_document()
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/models"):
        assert path in paths
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert "text/event-stream" in responses["200"]["content"]
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert json.loads(DOCUMENT.read_text())["info"]["title"] == "gemma-server"

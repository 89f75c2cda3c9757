"""The model's chat template renders in a sandboxed Jinja environment (transformers'
ImmutableSandboxedEnvironment), so even a hostile template could not reach Python internals; the
server never passes a client-supplied template (see tests/integration/test_hardening_http.py)."""

from __future__ import annotations

from pathlib import Path

import jinja2.exceptions
import pytest

from server.errors import BadRequestError
from server.pipeline.prompt import conversation_for_template, render_prompt
from server.protocols.openai.chat import turns_of
from server.protocols.openai.validation import check_request_fields
from server.protocols.openai.wire import ChatCompletionRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = messages.append(1) %}{{ x }}",
    ],
)
def test_hostile_templates_cannot_escape_the_sandbox(tokenizer, template: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((jinja2.exceptions.SecurityError, jinja2.exceptions.UndefinedError)):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, tokenize=False)


def test_template_syntax_in_messages_is_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "{{ 7 * 7 }}{% raw %}"}]}
    )
    text, _ids = render_prompt(tokenizer, conversation_for_template(turns_of(request.messages)))
    assert "{{ 7 * 7 }}{% raw %}" in text and "49" not in text


@pytest.mark.parametrize("field", ["chat_template", "chat_template_kwargs"])
def test_client_supplied_templates_are_refused_with_a_reason(field: str) -> None:
    value = "{{ evil }}" if field == "chat_template" else {"a": 1}
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}
    )
    assert field not in ChatCompletionRequest.model_fields  # nothing in the prompt builder can read it
    with pytest.raises(BadRequestError) as caught:
        check_request_fields(request)
    assert caught.value.param == field and caught.value.code == "unsupported_parameter"
    assert "model's own template" in caught.value.message

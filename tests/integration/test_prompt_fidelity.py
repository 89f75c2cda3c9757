"""Prompt fidelity: the token ids the server hands the engine equal the checkpoint's own processor's.

For every message shape of the differential table, transformers' `AutoProcessor` of the tiny
checkpoint (its chat template, then Gemma3Processor expanding each image into its tokens, with
pan-and-scan where the server uses it) must give exactly the prompt the server generated from. Where
the server normalizes the messages, the processor gets the spelled-out equivalent (the peer's body).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.differential_cases import CHAT_CASES, Case
from tests.support.live_server import SERVED_MODEL
from tests.support.sse import call


@pytest.fixture(scope="session")
def hf_processor(tiny_model_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _pil(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def _hf_messages(messages: list[dict]) -> list[dict]:
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": _pil(part["image_url"]["url"])} if part["type"] == "image_url" else part
                for part in content
            ]
        converted.append({"role": message["role"], "content": content})
    return converted


def processor_prompt_ids(processor: Any, messages: list[dict], pan_and_scan: bool) -> list[int]:
    has_images = any(
        isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"]) for m in messages
    )
    out = processor.apply_chat_template(
        _hf_messages(messages),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"do_pan_and_scan": pan_and_scan} if has_images else {},
    )
    ids = out["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


@pytest.mark.parametrize("case", CHAT_CASES, ids=[case.name for case in CHAT_CASES])
def test_prompt_ids_equal_the_checkpoint_processor(case: Case, base_url: str, hf_processor: Any) -> None:
    ours = call(
        base_url,
        "chat",
        {"model": SERVED_MODEL, "messages": case.body["messages"], "max_tokens": 1, "return_token_ids": True},
    )
    assert ours.status == 200, ours.body
    expected = processor_prompt_ids(hf_processor, case.peer_request["messages"], case.pan_and_scan)
    assert ours.prompt_token_ids == [expected]

"""Chat requests answered both by the server and by vLLM's offline `LLM.chat` (the oracle).

Images are data URIs here, so the oracle decodes exactly the same pixels; the server tests also send
some of them by http URL.
"""

from __future__ import annotations

from server.tiny_adapter import DEFAULT_ADAPTERS
from tests.support.images import data_uri, encode, make_image

RED_PNG = data_uri(encode(make_image(320, 240, (200, 40, 40)), "PNG"))
BLUE_JPEG = data_uri(encode(make_image(640, 480, (30, 90, 200)), "JPEG", quality=90), "image/jpeg")
WIDE_PNG = data_uri(encode(make_image(900, 200, (10, 160, 60)), "PNG"))


# The tiny LoRA adapters (server/tiny_adapter.py, by name and seed) the live server, vLLM's server and
# the oracle all serve, and the cases each adapter answers (engine ids in this order: 1, 2).
LORA_ADAPTERS = DEFAULT_ADAPTERS
LORA_CASES = ("text", "system", "image")
LORA_MAX_RANK = 8


def lora_case_name(case: str, adapter: str) -> str:
    return f"{case}@{adapter}"


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


CASES: list[dict] = [
    {"name": "text", "max_tokens": 12, "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {
        "name": "system",
        "max_tokens": 10,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primes."},
        ],
    },
    {
        "name": "multi_turn",
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
    },
    {
        "name": "image",
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, _image(RED_PNG)]}
        ],
    },
    {
        "name": "image_first",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": [_image(BLUE_JPEG), {"type": "text", "text": "Describe it."}]}],
    },
    {
        "name": "two_images",
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    _image(RED_PNG),
                    {"type": "text", "text": "with"},
                    _image(WIDE_PNG),
                ],
            }
        ],
    },
    {
        "name": "system_image_multi_turn",
        "max_tokens": 8,
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": [_image(BLUE_JPEG), {"type": "text", "text": "What colour dominates?"}]},
            {"role": "assistant", "content": "Bleu."},
            {"role": "user", "content": "And the shape?"},
        ],
    },
]

"""Requests answered both by this server and by vLLM's own OpenAI server on the same checkpoint.

Each case is a request body (the model name is added by the test). By default both servers get the
same body and must produce the same tokens. A case with `peer_body` is where this server deliberately
differs (`differs` says why): the peer gets `peer_body`, the request that spells out what this
server does, and both must again produce the same tokens. `peer_rejects` marks cases the peer refuses
as sent (its template raises), which the test also checks. `compare_peer=False`: no peer equivalent
exists (pan-and-scan on a `detail: high` image); the test checks this server's own behaviour.

Images are data URIs, so both servers decode the same bytes. With pan-and-scan on (the test server),
only BLUE_JPEG (640x480) and TALL_PNG (300x1000) are large and elongated enough to get crops; the
others are one view whatever their `detail`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.support.images import data_uri, encode, make_image
from tests.support.oracle_cases import BLUE_JPEG, RED_PNG, WIDE_PNG

TALL_PNG = data_uri(encode(make_image(300, 1000, (120, 30, 160)), "PNG"))
ALLWINDOWS_TOKEN = 124415  # the tiny model's favourite first token


def image(url: str, detail: str = "auto") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def system(content: Any) -> dict[str, Any]:
    return {"role": "system", "content": content}


@dataclass
class Case:
    name: str
    body: dict[str, Any]
    endpoint: str = "chat"  # "chat" or "completions"
    peer_body: dict[str, Any] | None = None
    differs: str | None = None
    peer_rejects: bool = False
    compare_peer: bool = True
    pan_and_scan: bool = False  # the prompt this server builds uses pan-and-scan crops
    tags: list[str] = field(default_factory=list)

    @property
    def peer_request(self) -> dict[str, Any]:
        return self.peer_body if self.peer_body is not None else self.body


def chat(name: str, messages: list[dict[str, Any]], max_tokens: int = 8, **extra: Any) -> Case:
    return Case(name, {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra})


HAIKU = [user("Write a haiku about the sea.")]
COUNT = [user("Count to ten.")]
RAIN = [user("Write a poem about rain.")]
FRUITS = [user("List three fruits.")]

CHAT_CASES: list[Case] = [
    # ---- message shapes ----
    chat("text", HAIKU, 12),
    chat("system", [system("You are a terse assistant."), user("Name three primes.")], 10),
    chat("multi_turn", [user("Hi!"), assistant("Hello. How can I help?"), user("Tell me a joke.")], 10),
    chat(
        "long_multi_turn",
        [
            system("Answer in French."),
            user("Hi"),
            assistant("Bonjour"),
            user("How are you?"),
            assistant("Bien."),
            user("And the weather?"),
        ],
        8,
    ),
    chat("image_after_text", [user([text("What is in this picture?"), image(RED_PNG)])], 10),
    chat("image_before_text_low_detail", [user([image(BLUE_JPEG, "low"), text("Describe it.")])], 8),
    chat("image_only", [user([image(WIDE_PNG)])], 6),
    chat("two_images_one_turn", [user([text("Compare"), image(RED_PNG), text("with"), image(WIDE_PNG)])], 8),
    chat(
        "image_in_earlier_turn",
        [user([image(RED_PNG), text("What colour?")]), assistant("Red."), user("And the shape?")],
        8,
    ),
    chat(
        "images_in_two_turns",
        [user([image(RED_PNG)]), assistant("A red picture."), user([image(WIDE_PNG), text("And this one?")])],
        8,
    ),
    chat(
        "three_images_in_different_positions",
        [
            user(
                [
                    image(WIDE_PNG, "low"),
                    text("first, then"),
                    image(RED_PNG, "low"),
                    text("and last"),
                    image(BLUE_JPEG, "low"),
                ]
            )
        ],
        8,
    ),
    chat(
        "system_image_multi_turn",
        [
            system("Answer in French."),
            user([image(BLUE_JPEG, "low"), text("What colour dominates?")]),
            assistant("Bleu."),
            user("And the shape?"),
        ],
        8,
    ),
    chat("text_parts", [user([text("Hello"), text("world, how are you?")])], 8),
    chat("unicode", [user("Ünïcödé 🌍 日本語のテキスト — ¿qué tal?")], 8),
    chat("long_system_prompt", [system("Rule. " * 200), user("Go.")], 6),
    # ---- sampling parameters ----
    chat("stop_string", COUNT, 16, stop="Donc"),
    chat("stop_list", FRUITS, 16, stop=[" dost", "never-there"]),
    chat("stop_string_kept", COUNT, 16, stop="Donc", include_stop_str_in_output=True),
    chat("stop_token_ids", RAIN, 16, stop_token_ids=[239066]),
    chat("n3", HAIKU, 6, n=3, temperature=0.7, seed=21),
    chat("max_tokens_1", HAIKU, 1),
    Case("max_completion_tokens", {"messages": COUNT, "max_completion_tokens": 20, "temperature": 0}),
    chat("seed_temperature_1", HAIKU, 12, temperature=1.0, seed=42),
    chat("seed_top_k_top_p", HAIKU, 12, temperature=0.8, top_p=0.9, top_k=20, seed=7),
    chat("seed_n2", HAIKU, 8, temperature=1.0, seed=3, n=2),
    chat("seed_min_p", RAIN, 12, temperature=1.0, min_p=0.2, seed=5),
    chat("penalties", COUNT, 16, presence_penalty=1.5, frequency_penalty=1.0),
    chat("repetition_penalty", COUNT, 16, repetition_penalty=1.5),
    chat("logit_bias", HAIKU, 8, logit_bias={str(ALLWINDOWS_TOKEN): -100}),
    chat("ignore_eos_min_tokens", HAIKU, 10, ignore_eos=True, min_tokens=10),
    chat("logprobs", HAIKU, 6, logprobs=True),
    chat("top_logprobs", HAIKU, 6, logprobs=True, top_logprobs=5),
    chat("logprobs_with_image", [user([image(RED_PNG), text("Caption")])], 6, logprobs=True, top_logprobs=2),
    # ---- streaming ----
    chat("stream_text", HAIKU, 10, stream=True),
    chat(
        "stream_image_logprobs", [user([text("See"), image(WIDE_PNG)])], 8, stream=True, logprobs=True, top_logprobs=3
    ),
    chat("stream_n2_seed", HAIKU, 8, stream=True, n=2, temperature=1.0, seed=11),
    # ---- where this server deliberately differs ----
    Case(
        "consecutive_user_turns",
        {"messages": [user("First part."), user("Second part.")], "max_tokens": 8, "temperature": 0},
        peer_body={"messages": [user("First part.\n\nSecond part.")], "max_tokens": 8, "temperature": 0},
        differs="Gemma 3's template refuses consecutive user turns; this server merges them.",
        peer_rejects=True,
    ),
    Case(
        "late_system_message",
        {
            "messages": [user("Hi"), assistant("Hello"), system("Be brief."), user("Why?")],
            "max_tokens": 8,
            "temperature": 0,
        },
        peer_body={
            "messages": [system("Be brief."), user("Hi"), assistant("Hello"), user("Why?")],
            "max_tokens": 8,
            "temperature": 0,
        },
        differs="Only a leading system message fits Gemma 3's template; this server moves later ones to the front.",
        peer_rejects=True,
    ),
    Case(
        "system_text_parts",
        {"messages": [system([text("Be brief."), text("Be kind.")]), user("Hi")], "max_tokens": 8, "temperature": 0},
        peer_body={"messages": [system("Be brief.\n\nBe kind."), user("Hi")], "max_tokens": 8, "temperature": 0},
        differs="Gemma 3's template keeps only the first text part of a system message; this server keeps them all.",
    ),
    Case(
        "starts_with_assistant",
        {"messages": [system("S"), assistant("How can I help?"), user("Hi")], "max_tokens": 8, "temperature": 0},
        peer_body={
            "messages": [system("S"), user(""), assistant("How can I help?"), user("Hi")],
            "max_tokens": 8,
            "temperature": 0,
        },
        differs="Gemma 3 needs a user turn first; this server inserts an empty one.",
        peer_rejects=True,
    ),
    Case(
        "tool_call_history",
        {
            "messages": [
                user("Weather in Paris?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
            ],
            "max_tokens": 8,
            "temperature": 0,
        },
        peer_body={
            "messages": [
                user("Weather in Paris?"),
                assistant('{"name": "get_weather", "arguments": {"city": "Paris"}}'),
                user("Result of get_weather:\n```tool_output\n18 C\n```"),
            ],
            "max_tokens": 8,
            "temperature": 0,
        },
        differs="Gemma 3 has no tool role: calls become the model's text, results a user turn.",
    ),
    Case(
        "detail_high_pan_and_scan",
        {"messages": [user([image(TALL_PNG, "high"), text("Read it.")])], "max_tokens": 6, "temperature": 0},
        differs="vLLM ignores `detail`; here high/auto run Gemma 3's pan-and-scan (3 extra crops of this image).",
        compare_peer=False,
        pan_and_scan=True,
    ),
    Case(
        "detail_auto_mixed_with_low",
        {
            "messages": [user([image(BLUE_JPEG, "low"), image(TALL_PNG), text("Both?")])],
            "max_tokens": 6,
            "temperature": 0,
        },
        differs="One image wants pan-and-scan (auto): the prompt gets it for all images, as vLLM takes it per prompt.",
        compare_peer=False,
        pan_and_scan=True,
    ),
]

COMPLETION_CASES: list[Case] = [
    Case("completion_text", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}, "completions"),
    Case(
        "completion_token_ids",
        {"prompt": [2, 818, 5279, 529, 7001, 563], "max_tokens": 8, "temperature": 0},
        "completions",
    ),
    Case(
        "completion_logprobs",
        {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 3},
        "completions",
    ),
    Case(
        "completion_stop_seed",
        {"prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "seed": 9, "stop": ["e"]},
        "completions",
    ),
    Case("completion_stream", {"prompt": "A list:", "max_tokens": 10, "temperature": 0, "stream": True}, "completions"),
    Case("completion_batch", {"prompt": ["One", "Two three"], "max_tokens": 5, "temperature": 0}, "completions"),
]

CASES = CHAT_CASES + COMPLETION_CASES

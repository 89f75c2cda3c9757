"""Raw HTTP calls to an OpenAI-compatible server, reduced to what two servers can be compared on.

`call` returns the prompt token ids, and per choice the output token ids, text, finish reason and
logprobs, whether the response was a JSON body or an SSE stream (the chunks are joined).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class ChoiceOutcome:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    # (token, logprob, {alternative token: logprob}); logprob None for a token without one
    logprobs: list[tuple[str, float | None, dict[str, float]]] = field(default_factory=list)


@dataclass
class Outcome:
    status: int
    prompt_token_ids: list[list[int]] = field(default_factory=list)  # one list per prompt
    choices: dict[int, ChoiceOutcome] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    body: Any = None  # the JSON body, or the list of chunks
    headers: dict[str, str] = field(default_factory=dict)

    def choice(self, index: int) -> ChoiceOutcome:
        return self.choices.setdefault(index, ChoiceOutcome())


def call(base_url: str, endpoint: str, body: dict[str, Any], timeout: float = 120) -> Outcome:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    if not body.get("stream"):
        response = httpx.post(base_url + path, json=body, timeout=timeout)
        outcome = Outcome(response.status_code, headers=dict(response.headers))
        outcome.body = response.json()
        if response.status_code == 200:
            _add(outcome, outcome.body)
        return outcome
    with httpx.stream("POST", base_url + path, json=body, timeout=timeout) as response:
        outcome = Outcome(response.status_code, headers=dict(response.headers))
        if response.status_code != 200:
            response.read()
            outcome.body = response.json()
            return outcome
        chunks = []
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            chunks.append(chunk)
            _add(outcome, chunk)
        outcome.body = chunks
        return outcome


def _add_prompt(outcome: Outcome, ids: list[int]) -> None:
    # Servers repeat a prompt's ids per choice (and vLLM per streamed choice): keep each prompt once.
    if list(ids) not in outcome.prompt_token_ids:
        outcome.prompt_token_ids.append(list(ids))


def _add(outcome: Outcome, body: dict[str, Any]) -> None:
    if body.get("usage"):
        outcome.usage = body["usage"]
    if body.get("prompt_token_ids"):
        _add_prompt(outcome, body["prompt_token_ids"])
    for raw in body.get("choices", []):
        choice = outcome.choice(raw["index"])
        if raw.get("prompt_token_ids"):
            _add_prompt(outcome, raw["prompt_token_ids"])
        choice.token_ids.extend(raw.get("token_ids") or [])
        if "message" in raw:
            choice.text += raw["message"].get("content") or ""
        elif "delta" in raw:
            choice.text += raw["delta"].get("content") or ""
        else:
            choice.text += raw.get("text") or ""
        choice.finish_reason = raw.get("finish_reason") or choice.finish_reason
        logprobs = raw.get("logprobs")
        if not logprobs:
            continue
        if "content" in logprobs:  # chat
            for entry in logprobs["content"] or []:
                top = {alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs") or []}
                choice.logprobs.append((entry["token"], entry.get("logprob"), top))
        else:  # completions
            for token, logprob, top in zip(
                logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
            ):
                choice.logprobs.append((token, logprob, dict(top or {})))

"""A scripted `EngineClient`: the serving logic runs in process, the model's text is chosen by the test.

It has the real tokenizer of the tiny checkpoint, so prompts are real; `reply(prompt_text, options)`
gives the text each choice "generates", streamed token by token when the request streams. It
records every `SamplingOptions` it was asked to use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from server.generation import ChoiceDelta, EnginePrompt, EngineStep, PreparedPrompt, SamplingOptions, TokenLogprob

Reply = Callable[[str, SamplingOptions], str]


class FakeEngine:
    model_name = "fake-gemma"
    max_model_len = 1024

    def __init__(self, tokenizer: Any, reply: Reply) -> None:
        self._tokenizer = tokenizer
        self.reply = reply
        self.seen: list[SamplingOptions] = []
        self.prompts: list[str] = []

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def is_ready(self) -> bool:
        return True

    @property
    def is_dead(self) -> bool:
        return False

    def default_sampling(self) -> dict[str, Any]:
        return {}

    async def prepare(self, prompt: EnginePrompt) -> PreparedPrompt:
        return PreparedPrompt(token_ids=list(prompt.token_ids), num_image_tokens=0, engine_input=None)

    async def generate(
        self, prompt: PreparedPrompt, options: SamplingOptions, request_id: str
    ) -> AsyncIterator[EngineStep]:
        self.seen.append(options)
        prompt_text = self._tokenizer.decode(prompt.token_ids)
        self.prompts.append(prompt_text)
        text = self.reply(prompt_text, options)
        ids = self._tokenizer.encode(text, add_special_tokens=False)[: options.max_tokens]
        finish = "stop" if len(ids) < options.max_tokens else "length"
        pieces = [self._tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
        texts = [b[len(a) :] for a, b in zip(["", *pieces], pieces, strict=False)]
        if not options.stream:
            yield EngineStep(
                choices=[
                    ChoiceDelta(index, "".join(texts), list(ids), finish, logprobs=self._logprobs(ids, texts, options))
                    for index in range(options.n)
                ],
                finished=True,
            )
            return
        for position, (token, piece) in enumerate(zip(ids, texts, strict=True)):
            last = position == len(ids) - 1
            yield EngineStep(
                choices=[
                    ChoiceDelta(
                        index,
                        piece,
                        [token],
                        finish if last else None,
                        logprobs=self._logprobs([token], [piece], options),
                    )
                    for index in range(options.n)
                ],
                finished=last,
            )

    def _logprobs(self, ids: list[int], texts: list[str], options: SamplingOptions) -> list[TokenLogprob] | None:
        if options.logprobs is None:
            return None
        return [TokenLogprob(i, t, -0.5, [(i, t, -0.5), (0, "<pad>", -3.0)]) for i, t in zip(ids, texts, strict=True)]

    async def abort(self, request_id: str) -> None:
        pass

    async def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

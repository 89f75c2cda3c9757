"""The per-token pieces of a streamed chat completion in the API process, each timed alone (CPU
microseconds per token, this process, one thread), to see where the per-token cost T of
`bench.cost` goes and what the "cheaper detokenization and JSON" candidates could save:

- detokenize: vLLM's incremental detokenizer step (`tokenizers.decoders.DecodeStream`, what
  vLLM's FastIncrementalDetokenizer runs in the API process for ours and for vLLM's server alike);
- ours: one `chat.completion.chunk` event from `ChunkEncoder.delta` (a pre-serialized frame around
  the orjson-encoded text);
- vllm: the same event as vLLM's server makes it (`ChatCompletionStreamResponse` built from pydantic
  models, `model_dump_json(exclude_unset=True)`, framed and encoded).

The text is a real English paragraph in Gemma 3's tokenizer, one token per event.

    python -m bench.token_path [--model DIR] [--seconds S]     # prints JSON
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and "
    "a small brass lamp. From the gallery he could see the whole bay: the fishing boats coming home, "
    "the gulls settling on the breakwater, and far out, the dark line where the sea met the sky. "
)


def _per_token(run_all: Callable[[], int], seconds: float) -> float:
    """CPU microseconds per token of `run_all` (which handles every token once and returns how many)."""
    run_all()
    tokens = 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        tokens += run_all()
    return 1e6 * (time.thread_time() - cpu0) / tokens


def measure(model_dir: str, seconds: float) -> dict[str, Any]:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
    from vllm.entrypoints.generate.base.protocol import DeltaMessage
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponseStreamChoice,
        ChatCompletionStreamResponse,
    )

    from server.protocols.openai.chat import ChunkEncoder

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids = tokenizer.encode(PARAGRAPH * 4, add_special_tokens=False).ids
    pieces = [piece for piece in (tokenizer.decode(ids[: i + 1]) for i in range(len(ids)))]
    texts = [pieces[0]] + [pieces[i][len(pieces[i - 1]) :] for i in range(1, len(pieces))]
    assert "".join(texts) == tokenizer.decode(ids)

    def detokenize() -> int:
        stream = DecodeStream(skip_special_tokens=True)
        for token_id in ids:
            stream.step(tokenizer, token_id)
        return len(ids)

    def ours() -> int:
        encoder = ChunkEncoder("chatcmpl-0123456789abcdef", "tiny-gemma3", include_usage=True, return_token_ids=False)
        for text in texts:
            encoder.delta(0, text)
        return len(texts)

    def vllm() -> int:
        created = int(time.time())
        for text in texts:
            choice = ChatCompletionResponseStreamChoice(
                index=0, delta=DeltaMessage(content=text), logprobs=None, finish_reason=None
            )
            chunk = ChatCompletionStreamResponse(
                id="chatcmpl-0123456789abcdef", object="chat.completion.chunk", created=created,
                choices=[choice], model="tiny-gemma3",
            )  # fmt: skip
            f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n".encode()
        return len(texts)

    steps = {"detokenize": detokenize, "ours": ours, "vllm": vllm}
    return {"tokens": len(ids), "us_per_token": {name: _per_token(step, seconds) for name, step in steps.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/gemma-server/tiny-gemma3"))
    parser.add_argument("--seconds", type=float, default=3.0, help="wall time per step")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.seconds)))


if __name__ == "__main__":
    main()

"""Workloads: the requests every target receives, deterministic from a seed.

A workload is a kind of request (text non-streaming, text streaming, image+text streaming) sent at
one concurrency. Each request has its own prompt (and its own image), so neither the prefix cache
nor vLLM's processed-image cache flatter a target; the same seed gives the same requests to every
target and every trial.

The same `BenchRequest` is sent over HTTP by `bench.client` (as an OpenAI chat body, built once,
before timing) and rendered to engine inputs by `bench.ceiling` (the in-process ceiling).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import orjson

from bench.images import BenchImage

KINDS = ("text", "text-stream", "image-stream")

# Plain English words: prompts tokenize like real text (a few characters per token).
_WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the of and to in is was for on are with as his they be at one have this from or had by word "
    "but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water "
    "than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before "
    "move right boy old too same tell does set three want air well also play small end put home "
    "read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near "
    "build self earth father head stand own page"
).split()

SYSTEM_PROMPT = "You are a helpful assistant. Answer in plain prose."


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int  # unique across the whole run: it picks the prompt words and the image
    text: str
    image: BenchImage | None = None


@dataclass(slots=True)
class Cell:
    """One measurement: a kind of request at one concurrency, with its warm-up requests first."""

    kind: str
    concurrency: int
    warmup: list[BenchRequest]
    requests: list[BenchRequest]
    round: int = 0  # repetition within one start of a target (each with its own prompts and images)
    stream: bool = field(init=False)

    def __post_init__(self) -> None:
        self.stream = self.kind != "text"

    @property
    def name(self) -> str:
        return f"{self.kind} c={self.concurrency}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run measures: the cells, the output length, and how many images they need."""

    seed: int
    output_tokens: int
    prompt_words: int
    kinds: tuple[str, ...]
    concurrencies: tuple[int, ...]
    requests_per_cell: dict[int, int]  # concurrency -> measured requests
    image_requests_scale: float  # image cells send this fraction of the text request count
    rounds: int = 1  # every cell this many times per start of a target

    def cell_sizes(self) -> list[tuple[int, str, int, int, int]]:
        """(round, kind, concurrency, warm-up count, measured count) for every cell, in run order."""
        sizes = []
        for round_ in range(self.rounds):
            for kind in self.kinds:
                for concurrency in self.concurrencies:
                    count = self.requests_per_cell[concurrency]
                    if kind == "image-stream":
                        count = max(concurrency, int(count * self.image_requests_scale))
                    sizes.append((round_, kind, concurrency, min(concurrency, 8), count))
        return sizes

    def images_needed(self) -> int:
        return sum(w + n for _r, kind, _c, w, n in self.cell_sizes() if kind == "image-stream")


def prompt_text(index: int, seed: int, words: int) -> str:
    rng = random.Random(seed * 1_000_003 + index)
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    # The request number up front makes every prompt differ from its first tokens.
    return f"Request {index}. Summarize the following notes: {body}"


def build_cells(plan: Plan, images: list[BenchImage]) -> list[Cell]:
    """Deals out unique prompt indices (and images) to every cell's warm-up and measured requests."""
    cells = []
    next_index = 0
    next_image = 0
    for round_, kind, concurrency, warmup_count, count in plan.cell_sizes():
        batch: list[BenchRequest] = []
        for _ in range(warmup_count + count):
            image = None
            if kind == "image-stream":
                image = images[next_image]
                next_image += 1
            batch.append(BenchRequest(next_index, prompt_text(next_index, plan.seed, plan.prompt_words), image))
            next_index += 1
        cells.append(Cell(kind, concurrency, batch[:warmup_count], batch[warmup_count:], round_))
    return cells


def chat_messages(request: BenchRequest, image_uri: str | None = None) -> list[dict[str, object]]:
    """The OpenAI `messages` of a request; the ceiling renders the same list with the chat template."""
    if request.image is None:
        user: object = request.text
    else:
        user = [
            {"type": "image_url", "image_url": {"url": image_uri or request.image.data_uri()}},
            {"type": "text", "text": request.text},
        ]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def chat_body(request: BenchRequest, *, model: str, stream: bool, output_tokens: int) -> bytes:
    """The JSON body sent to both HTTP servers.

    Greedy decoding and a fixed `max_tokens`: every target generates the same tokens. `ignore_eos`
    and `min_tokens` (vLLM extensions) make the peer generate exactly `output_tokens`; servers that
    do not know them ignore them, and the client reports any request that ended early.
    """
    body: dict[str, object] = {
        "model": model,
        "messages": chat_messages(request),
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "min_tokens": output_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)

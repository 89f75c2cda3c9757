"""The start-up self-test: a canned text+image chat request through the pipeline and the engine.

The server reports ready only after this passes. It proves the chat template, the image decoder,
vLLM's multimodal processor and the engine work together, and it pays one-time costs (the
processor's first load, first-run kernels) before the first user request instead of during it.
"""

from __future__ import annotations

import base64
import io
import logging
import time

from PIL import Image as PILImage
from PIL import ImageDraw

from server.pipeline.pipeline import Pipeline
from server.pipeline.request import ChatInput, GenerationRequest, Image, Output, Sampling, Text, Turn

log = logging.getLogger(__name__)


def _canned_image_uri() -> str:
    image = PILImage.new("RGB", (96, 64), (240, 200, 40))
    ImageDraw.Draw(image).rectangle([20, 10, 70, 50], fill=(20, 60, 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def run_self_test(pipeline: Pipeline) -> float:
    """Raises if the canned request fails; returns the seconds it took. It goes through the pipeline
    as any protocol's request does (no admission slot: nothing else runs yet)."""
    started = time.monotonic()
    uri = _canned_image_uri()
    # "low" runs the plain processor; "high" runs pan-and-scan when it is enabled.
    details = ["low", "high"] if pipeline.settings.images.pan_and_scan else ["low"]
    for detail in details:
        turns = [
            Turn("system", "Self-test."),
            Turn("user", [Text("Describe the picture."), Image(uri, detail, "messages[1].content[1].image_url")]),
        ]
        request = GenerationRequest(
            request_id=f"selftest-{detail}",
            route="selftest",
            model=None,
            sampling=Sampling(temperature=0),
            output=Output(max_tokens=2),
            chat=ChatInput(turns),
        )
        run = await pipeline.start(request)
        try:
            choices = await run.collect()
        finally:
            await run.aclose()
        if choices[0].finish_reason not in ("length", "stop") or run.usage.image_tokens < 1:
            raise RuntimeError(f"self-test returned an unexpected result: {choices}, {run.usage}")
    elapsed = time.monotonic() - started
    log.info("self-test passed in %.1f s", elapsed)
    return elapsed

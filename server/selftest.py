"""The start-up self-test: a canned text+image chat request through the whole serving path.

The server reports ready only after this passes. It proves the chat template, the image decoder,
vLLM's multimodal processor and the engine work together, and it pays one-time costs (the
processor's first load, first-run kernels) before the first user request instead of during it.
"""

from __future__ import annotations

import base64
import io
import logging
import time

import orjson
from PIL import Image, ImageDraw

from server.chat import ChatService
from server.protocols.openai.wire import ChatCompletionRequest

log = logging.getLogger(__name__)


def _canned_image_uri() -> str:
    image = Image.new("RGB", (96, 64), (240, 200, 40))
    ImageDraw.Draw(image).rectangle([20, 10, 70, 50], fill=(20, 60, 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def run_self_test(chat: ChatService) -> float:
    """Raises if the canned request fails; returns the seconds it took."""
    started = time.monotonic()
    uri = _canned_image_uri()
    # "low" runs the plain processor; "high" runs pan-and-scan when it is enabled.
    details = ["low", "high"] if chat.settings.images.pan_and_scan else ["low"]
    for detail in details:
        request = ChatCompletionRequest.model_validate(
            {
                "model": chat.engine.model_name,
                "messages": [
                    {"role": "system", "content": "Self-test."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Describe the picture."},
                            {"type": "image_url", "image_url": {"url": uri, "detail": detail}},
                        ],
                    },
                ],
                "max_tokens": 2,
                "temperature": 0,
            }
        )
        response = await chat.create(request, None)
        body = orjson.loads(response.body)
        choice = body["choices"][0]
        if (
            choice["finish_reason"] not in ("length", "stop")
            or body["usage"]["prompt_tokens_details"]["image_tokens"] < 1
        ):
            raise RuntimeError(f"self-test returned an unexpected response: {body}")
    elapsed = time.monotonic() - started
    log.info("self-test passed in %.1f s", elapsed)
    return elapsed

"""Image preprocessing rate per core: one 1920x1080 JPEG through the server's decode path and the
Gemma 3 processor, as vLLM runs it, in this single process with one torch thread.

Steps, timed separately (CPU seconds of this process, so that other tenants of the machine do not
distort a per-core figure; wall time is reported too):
- decode: `server.media.decode_data_uri` + `decode_image` (base64, PIL decode, EXIF, RGB), as the
  server does for a data URI;
- hash: vLLM's content hash of the decoded image (blake3 over the pixels), which vLLM computes for
  its processed-image cache on every request;
- process: the Gemma 3 HF processor call vLLM makes (prompt + image -> token ids and normalized
  pixel tensors), at the tiny model's 64x64 and at gemma-3-4b-it's 896x896.

Run as `python -m bench.preprocess [--model DIR] [--seconds S]`; prints JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from bench.images import photo_like

GEMMA_4B_IMAGE_SIZE = 896  # gemma-3-4b-it's preprocessor_config.json: size 896x896, mean/std 0.5


def _test_jpeg() -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    photo_like(1920, 1080, np.random.default_rng(1920)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _rate(step: Callable[[], Any], seconds: float) -> dict[str, float]:
    """Runs `step` repeatedly for about `seconds` of wall time; per-item CPU and wall milliseconds."""
    step()  # first call pays one-time costs (lazy imports, allocations)
    count = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds or count < 5:
        step()
        count += 1
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    return {"count": count, "cpu_ms": 1000 * cpu / count, "wall_ms": 1000 * wall / count}


def measure(model_dir: str, seconds: float) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor
    from vllm.multimodal.hasher import MultiModalHasher

    from server.media import decode_data_uri, decode_image

    torch.set_num_threads(1)  # per core: vLLM also pins the processor to one torch thread
    jpeg = _test_jpeg()
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    image = decode_image(decode_data_uri(uri, 1 << 26, "p"), 50_000_000, "p")

    processor = AutoProcessor.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    prompt = f"<start_of_turn>user\n{processor.boi_token} Describe.<end_of_turn>\n<start_of_turn>model\n"
    tiny_size = dict(processor.image_processor.size)

    def process(size: int) -> Callable[[], Any]:
        def step() -> Any:
            return processor(text=prompt, images=[image], return_tensors="pt", size={"height": size, "width": size})

        return step

    steps = {
        "decode": lambda: decode_image(decode_data_uri(uri, 1 << 26, "p"), 50_000_000, "p"),
        "hash": lambda: MultiModalHasher.hash_kwargs("blake3", model_id="m", image=image),
        f"process_{tiny_size['height']}": process(tiny_size["height"]),
        f"process_{GEMMA_4B_IMAGE_SIZE}": process(GEMMA_4B_IMAGE_SIZE),
    }
    results: dict[str, Any] = {name: _rate(step, seconds) for name, step in steps.items()}
    for size in (tiny_size["height"], GEMMA_4B_IMAGE_SIZE):
        shape = list(process(size)()["pixel_values"].shape)
        assert shape[-1] == size, f"the processor ignored size={size}: {shape}"
        results[f"process_{size}"]["pixel_values"] = shape
    for size_name in (f"process_{tiny_size['height']}", f"process_{GEMMA_4B_IMAGE_SIZE}"):
        total_cpu = results["decode"]["cpu_ms"] + results["hash"]["cpu_ms"] + results[size_name]["cpu_ms"]
        results[f"total_{size_name.split('_')[1]}"] = {"cpu_ms": total_cpu, "images_per_core_s": 1000 / total_cpu}
    return {"image": "1920x1080 JPEG q85", "jpeg_bytes": len(jpeg), "steps": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/gemma-server/tiny-gemma3"))
    parser.add_argument("--seconds", type=float, default=3.0, help="wall time per step")
    args = parser.parse_args()
    Image.MAX_IMAGE_PIXELS = None
    print(json.dumps(measure(args.model, args.seconds)))


if __name__ == "__main__":
    main()

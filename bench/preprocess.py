"""Image preprocessing rate per core: one 1920x1080 JPEG through the server's decode path and the
Gemma 3 processor, as vLLM runs it, in this single process with one torch thread.

Steps, timed separately (CPU seconds of this process, so that other tenants of the machine do not
distort a per-core figure; wall time is reported too):
- decode: `server.media.images.decode_data_uri` + `decode_image` (base64, PIL decode, EXIF, RGB), as the
  server does for a data URI;
- hash: vLLM's content hash of the decoded image (blake3 over the pixels), which vLLM computes for
  its processed-image cache on every request unless it is given an id (`multi_modal_uuids`);
- content id: what the server gives it instead, SHA-256 of the encoded bytes
  (`server.media.images.content_id`);
- draft decode: the JPEG decoded with Pillow's draft mode asked for 896x896 (the DCT scale that still
  covers that size), the candidate "decode at reduced scale"; the size it yields is reported;
- process: the Gemma 3 HF processor call vLLM makes (prompt + image -> token ids and normalized
  pixel tensors) at gemma-3-4b-it's 896x896, which is also the tiny checkpoint's geometry.

Then the whole pipeline (decode + hash + process at 896x896) in 1 and 2 processes at once, in
images/s of wall time: how the image work of several API processes scales with this machine's cores.

Run as `python -m bench.preprocess [--model DIR] [--seconds S] [--parallel N ...]`; prints JSON.
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


def _set_up(model_dir: str) -> tuple[bytes, str, Any, str]:
    """One torch thread (per core: vLLM also pins the processor to one), the test JPEG, its data
    URI, the checkpoint's processor and a one-image prompt."""
    import torch
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    jpeg = _test_jpeg()
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    processor = AutoProcessor.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    prompt = f"<start_of_turn>user\n{processor.boi_token} Describe.<end_of_turn>\n<start_of_turn>model\n"
    return jpeg, uri, processor, prompt


def measure(model_dir: str, seconds: float) -> dict[str, Any]:
    from vllm.multimodal.hasher import MultiModalHasher

    from server.media.images import content_id, decode_data_uri, decode_image

    jpeg, uri, processor, prompt = _set_up(model_dir)
    image = decode_image(decode_data_uri(uri, 1 << 26, "p"), 50_000_000, "p")
    size = {"height": GEMMA_4B_IMAGE_SIZE, "width": GEMMA_4B_IMAGE_SIZE}

    def draft_decode() -> Image.Image:
        picture = Image.open(io.BytesIO(jpeg))
        picture.draft("RGB", (GEMMA_4B_IMAGE_SIZE, GEMMA_4B_IMAGE_SIZE))
        return picture.convert("RGB")

    steps = {
        "decode": lambda: decode_image(decode_data_uri(uri, 1 << 26, "p"), 50_000_000, "p"),
        "hash": lambda: MultiModalHasher.hash_kwargs("blake3", model_id="m", image=image),
        "content_id": lambda: content_id(jpeg),
        "draft_decode": draft_decode,
        f"process_{GEMMA_4B_IMAGE_SIZE}": lambda: processor(
            text=prompt, images=[image], return_tensors="pt", size=size
        ),
    }
    results: dict[str, Any] = {name: _rate(step, seconds) for name, step in steps.items()}
    results["draft_decode"]["size"] = list(draft_decode().size)
    shape = list(steps[f"process_{GEMMA_4B_IMAGE_SIZE}"]()["pixel_values"].shape)
    assert shape[-1] == GEMMA_4B_IMAGE_SIZE, f"the processor ignored size={GEMMA_4B_IMAGE_SIZE}: {shape}"
    results[f"process_{GEMMA_4B_IMAGE_SIZE}"]["pixel_values"] = shape
    process_ms = results[f"process_{GEMMA_4B_IMAGE_SIZE}"]["cpu_ms"]
    for name, identify in (("hashing pixels", "hash"), ("content id", "content_id")):
        total_cpu = results["decode"]["cpu_ms"] + results[identify]["cpu_ms"] + process_ms
        results[f"total, {name}"] = {"cpu_ms": total_cpu, "images_per_core_s": 1000 / total_cpu}
    return {"image": "1920x1080 JPEG q85", "jpeg_bytes": len(jpeg), "steps": results}


def _pipeline(model_dir: str) -> Callable[[], Any]:
    """decode + vLLM's hash + the Gemma 3 processor at 896x896, for one 1920x1080 JPEG data URI."""
    from vllm.multimodal.hasher import MultiModalHasher

    from server.media.images import decode_data_uri, decode_image

    _, uri, processor, prompt = _set_up(model_dir)
    size = {"height": GEMMA_4B_IMAGE_SIZE, "width": GEMMA_4B_IMAGE_SIZE}

    def step() -> Any:
        image = decode_image(decode_data_uri(uri, 1 << 26, "p"), 50_000_000, "p")
        MultiModalHasher.hash_kwargs("blake3", model_id="m", image=image)
        return processor(text=prompt, images=[image], return_tensors="pt", size=size)

    return step


def _pipeline_worker(model_dir: str, seconds: float, start: Any, results: Any) -> None:
    step = _pipeline(model_dir)
    step()
    start.wait()  # all workers begin together, after their set-up
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        step()
        count += 1
    results.put(count)


def measure_parallel(model_dir: str, process_counts: list[int], seconds: float) -> dict[str, Any]:
    """Images/s (wall) through the whole image pipeline with N processes at once, one torch thread
    each: how the front end's image work scales with API processes on this machine's cores."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    rates: dict[str, Any] = {}
    for count in process_counts:
        start, results = spawn.Barrier(count), spawn.Queue()
        args = (model_dir, seconds, start, results)
        workers = [spawn.Process(target=_pipeline_worker, args=args) for _ in range(count)]
        for worker in workers:
            worker.start()
        done = sum(results.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join()
        rates[str(count)] = {"processes": count, "images_per_s": done / seconds}
    return rates


def measure_vllm_path(config_path: str, per_mode: int) -> dict[str, Any]:
    """vLLM's own multimodal path in the API process (`BaseRenderer._process_multimodal`, what runs
    in its single multimodal worker thread for every image), on distinct decoded 1920x1080 images
    resized to gemma-3-4b-it's 896x896, in three ways:

    - default: without an id, as vLLM's own server calls it (vLLM hashes the pixels, then copies and converts);
    - uuid: with `multi_modal_uuids` set from the server's content id (SHA-256 of the encoded bytes,
      what the server now sends; vLLM then skips hashing ~6 MB of pixels); exact, same pixels;
    - downscaled+uuid: the image already reduced to 896x896 in the decode step (PIL bilinear), so
      vLLM's copies and conversions touch 4x-8x fewer pixels; NOT bit-identical to today.
    """
    import numpy as np
    import torch
    from vllm.renderers import renderer_from_config

    from server.engine.vllm_engine import engine_args_from_settings
    from server.media.images import content_id, decode_image
    from server.settings import load_settings

    torch.set_num_threads(1)
    settings = load_settings(config_path)
    vllm_config = engine_args_from_settings(settings).create_engine_config()
    renderer = renderer_from_config(vllm_config)
    tokenizer = renderer.get_tokenizer()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    size = GEMMA_4B_IMAGE_SIZE
    kwargs = {"do_pan_and_scan": False, "size": {"height": size, "width": size}}

    def encoded(seed: int) -> bytes:
        buffer = io.BytesIO()
        photo_like(1920, 1080, np.random.default_rng(10_000 + seed)).save(buffer, "JPEG", quality=85)
        return buffer.getvalue()

    results: dict[str, Any] = {}
    renderer._process_multimodal(prompt, {"image": [decode_image(encoded(-1), 50_000_000, "p")]}, None, kwargs)
    for number, mode in enumerate(("default", "uuid", "downscaled+uuid")):
        cpu = 0.0
        for i in range(per_mode):
            data = encoded(number * per_mode + i)  # distinct images: vLLM's processed-image cache never hits
            image = decode_image(data, 50_000_000, "p")
            started = time.thread_time()
            uuids = None
            if mode != "default":
                uuids = {"image": [content_id(data)]}
            if mode == "downscaled+uuid":
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            renderer._process_multimodal(prompt, {"image": [image]}, uuids, kwargs)
            cpu += time.thread_time() - started
        results[mode] = {"count": per_mode, "cpu_ms": 1000 * cpu / per_mode}
    renderer.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/gemma-server/tiny-gemma3"))
    parser.add_argument("--config", default=None, help="also measure vLLM's multimodal path with this server config")
    parser.add_argument("--seconds", type=float, default=3.0, help="wall time per step")
    parser.add_argument("--parallel", type=int, nargs="*", default=[1, 2], metavar="N",
                        help="also the whole pipeline's images/s with N processes at once (default: 1 2)")  # fmt: skip
    args = parser.parse_args()
    Image.MAX_IMAGE_PIXELS = None
    result = measure(args.model, args.seconds)
    if args.parallel:
        result["parallel"] = measure_parallel(args.model, args.parallel, max(args.seconds, 5.0))
    if args.config:
        result["vllm_path"] = measure_vllm_path(args.config, per_mode=15)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

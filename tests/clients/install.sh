#!/usr/bin/env bash
# Installs the agent clients the live tests drive (tests/clients/package-lock.json, from the npm
# registry): Claude Code and Codex CLI. Their native binaries come inside registry packages
# (@anthropic-ai/claude-code-linux-x64, @openai/codex's linux-x64 build); the install scripts only
# link them into place.
# Idempotent; `make test-clients` (a prerequisite of `make test` and `make test-live`) calls it.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
node_modules/.bin/claude --version
node_modules/.bin/codex --version

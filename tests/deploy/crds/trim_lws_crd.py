"""Writes leaderworkerset.x-k8s.io_leaderworkersets.yaml from LWS's own CRD, with its three copies of
core Kubernetes schemas cut out (1.3 MB -> a few KB): the leader's and the worker's pod spec and the
volume claim templates become "any object" here, and tests/deploy/test_kubernetes.py validates those
parts against the Kubernetes schemas themselves (kubernetes-validate, strict) instead.

    git -C <lws checkout> show v0.10.0:config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml \\
        | python tests/deploy/crds/trim_lws_crd.py > tests/deploy/crds/leaderworkerset.x-k8s.io_leaderworkersets.yaml
"""

from __future__ import annotations

import sys

import yaml

SOURCE = (
    "kubernetes-sigs/lws v0.10.0 (2161f38ff333f9e24d3c44adef7cd5d9787cac00), "
    "config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"
)
CORE = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def main() -> None:
    crd = yaml.safe_load(sys.stdin)
    for version in crd["spec"]["versions"]:
        template = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["leaderWorkerTemplate"]
        for pod in ("leaderTemplate", "workerTemplate"):
            template["properties"][pod]["properties"]["spec"] = {**CORE, "description": "A core PodSpec (trimmed)."}
        claims = template["properties"]["volumeClaimTemplates"]
        claims["items"] = {**CORE, "description": "A core PersistentVolumeClaim (trimmed)."}
    sys.stdout.write(f"# From {SOURCE},\n# trimmed by tests/deploy/crds/trim_lws_crd.py (see there).\n")
    sys.stdout.write(yaml.safe_dump(crd, sort_keys=False, width=120))


if __name__ == "__main__":
    main()

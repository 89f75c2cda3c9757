#!/usr/bin/env bash
# PostgreSQL for the store tests (tests/unit/test_store.py starts a throwaway server of its own with
# tests/support/postgres.py; nothing here starts or configures one). Idempotent: installs Debian's
# postgresql package only when no initdb is found, and refreshes the package lists only then.
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "postgresql: $(ls -d /usr/lib/postgresql/*/bin/initdb | tr '\n' ' ')already installed"
    exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update
"${as_root[@]}" apt-get install -y --no-install-recommends postgresql
ls /usr/lib/postgresql/*/bin/initdb

"""A throwaway PostgreSQL server for tests: initdb into a temp dir under /tmp, start it on a free
localhost port, create one database, and stop and remove it all afterwards.

It uses the binaries of Debian's postgresql package (tests/services/install.sh installs them); it does
not touch the system cluster. PostgreSQL refuses to run as root, so as root the temp dir is given to
the `postgres` user and every command runs through `runuser -u postgres --`.

Durability is switched off (fsync, synchronous_commit, full_page_writes): this data lives for one
test session, and the tests measure behaviour, not crash safety.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "PostgreSQL is not installed: run `bash tests/services/install.sh`"
DATABASE = "gemma_store_test"
SERVER_USER = "postgres"


@dataclass
class PostgresServer:
    url: str
    """postgresql://postgres@127.0.0.1:<port>/gemma_store_test"""
    port: int
    data_dir: Path
    startup_seconds: float
    """initdb + start + createdb, as measured."""


def postgres_bin_dir() -> Path:
    """The newest installed PostgreSQL's bin folder."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(INSTALL_HINT)
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> None:
    result = subprocess.run(_as_server_user(command), capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def _temp_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="gemma-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server with an empty database `gemma_store_test`; stopped and deleted on exit."""
    bin_dir = postgres_bin_dir()
    started = time.monotonic()
    root = _temp_dir()
    data_dir, log_file, port = root / "data", root / "server.log", _free_port()
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    try:
        _run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SERVER_USER, "--auth=trust", "--no-sync", "-E", "UTF8"]
        )
        _run(
            [
                str(bin_dir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "30",
                "-D",
                str(data_dir),
                "-l",
                str(log_file),
                "-o",
                options,
            ]
        )
        try:
            _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", SERVER_USER, DATABASE])
            yield PostgresServer(
                url=f"postgresql://{SERVER_USER}@127.0.0.1:{port}/{DATABASE}",
                port=port,
                data_dir=data_dir,
                startup_seconds=time.monotonic() - started,
            )
        finally:
            _run([str(bin_dir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data_dir)])
    finally:
        shutil.rmtree(root, ignore_errors=True)

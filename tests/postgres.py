"""A real PostgreSQL server for the conversation tests (tests/conversations, tests/test_c1.py),
started once per session; tests/conftest.py makes its fixtures visible to every test.

``initdb`` makes a cluster in a temporary directory, ``pg_ctl start`` runs it on a free port of
127.0.0.1 (its unix socket in the same directory, fsync off), and ``pg_ctl stop -m fast`` on that
directory ends it at the end of the session. PostgreSQL refuses to run as root, so as root the
server runs as the ``postgres`` user (Debian's package makes it) or else ``nobody``. Tests skip,
saying what is missing, without the binaries (Debian's package ``postgresql``, binaries under
/usr/lib/postgresql/<version>/bin) or without psycopg (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "quorum"


def postgres_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: beside ``initdb`` on
    PATH (symlinks resolved), else Debian's newest /usr/lib/postgresql/<version>/bin."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates.extend(Path(p) for p in reversed(versions))
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _server_user() -> pwd.struct_passwd | None:
    """Who the server runs as: None for this process's own user (not root); else an
    unprivileged account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root and neither a `postgres` nor a `nobody` user exists to run it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A running PostgreSQL server: yields a libpq connection string (without ``dbname``)
    for its superuser over TCP on 127.0.0.1; trust authentication."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL's initdb/pg_ctl were not found on PATH or under "
            "/usr/lib/postgresql/*/bin (Debian package `postgresql`)"
        )
    user = _server_user()
    run_as: dict[str, Any] = {}
    if user is not None:
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    # Not pytest's tmp_path: as root that sits in a 0700 directory the server's user cannot enter.
    top = Path(tempfile.mkdtemp(prefix="quorum-pg-"))
    data, log = top / "data", top / "server.log"
    if user is not None:
        os.chown(top, user.pw_uid, user.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}

    def run(*args: str, timeout: float = 120) -> None:
        result = subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=timeout, cwd=top, **run_as
        )
        if result.returncode != 0:
            extra = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{extra}")

    port = _free_port()
    options = (
        f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
    )
    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
            "--no-sync", "-E", "UTF8", "--no-locale")  # fmt: skip
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        started = True
        yield f"host=127.0.0.1 port={port} user={SUPERUSER} connect_timeout=10"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def postgres_dsn(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server for one test: its connection string.
    Dropped after the test (``WITH (FORCE)`` ends connections a failed test left open)."""
    import psycopg

    name = f"t_{os.urandom(6).hex()}"
    with psycopg.connect(postgres_server + " dbname=postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}".encode())
    yield f"{postgres_server} dbname={name}"
    with psycopg.connect(postgres_server + " dbname=postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)".encode())

"""A throwaway PostgreSQL cluster for tests: Debian's `postgresql` binaries, a temporary data directory, a free
loopback port. Prefect's server points `PREFECT_SERVER_DATABASE_CONNECTION_URL` at `url`.

    with postgres_cluster() as url:   # postgresql+asyncpg://postgres@127.0.0.1:<port>/postgres
        ...

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user (created by Debian's
package) and every command runs through `runuser`. `.ci/run` installs the package (apt) before the load test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ow_prefect.testing.servers import free_port

INSTALL_HINT = "install Debian's postgresql (`apt-get install postgresql`, as .ci/run does)"


def postgres_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin (newest), else PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_owner() -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a non-root user."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError as error:
        raise RuntimeError(f"running as root needs the `postgres` user to own the cluster: {INSTALL_HINT}") from error
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """initdb + pg_ctl start a cluster (fsync off: test data) on a free loopback port; yield its asyncpg URL;
    stop it and delete its data on exit."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError(f"PostgreSQL's initdb was not found: {INSTALL_HINT}")
    owner = _as_owner()
    root = Path(tempfile.mkdtemp(prefix="ow-postgres-"))
    root.chmod(0o755)  # the postgres user must reach its data directory
    data = root / "data"
    if owner:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    log = root / "postgres.log"

    def run(*args: str) -> None:
        done = subprocess.run([*owner, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}{tail}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    options += " -c full_page_writes=off -c max_connections=200"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)

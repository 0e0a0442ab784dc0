"""Real local servers for tests: Prefect (SQLite, loopback), a Prefect worker, and moto's S3."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s; see {log}")


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


@contextlib.contextmanager
def prefect_server(home: Path, timeout: float = 90, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `prefect server start` (SQLite in `home`, unless `env` names another database) on a free loopback
    port; yield its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": "",
        **(env or {}),
    }
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(f"{url}/health", proc, timeout, log)
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def prefect_worker(
    api_url: str,
    pool: str,
    worker_type: str,
    env: dict[str, str],
    log: Path,
    extra_args: tuple[str, ...] = (),
    query_seconds: float | None = 1,
) -> Iterator[subprocess.Popen]:
    """Run `prefect worker start` in its own session (so SIGTERM reaches it, see shared notes); it polls every
    `query_seconds` (None: the worker type's default)."""
    worker_env = {**os.environ, **env, "PREFECT_API_URL": api_url, "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
    worker_env.pop("PREFECT_WORKER_QUERY_SECONDS", None)
    if query_seconds is not None:
        worker_env["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_prefect_cli(), "worker", "start", "--pool", pool, "--type", worker_type, *extra_args],
            env=worker_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()

"""Real local servers for tests: Prefect (SQLite, loopback), a Prefect worker, moto's S3, and a TCP proxy that
can be taken down."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


def migrated_database(path: Path, timeout: float = 240) -> Path:
    """A Prefect SQLite database at `path` with every migration applied, made once by `prefect server database
    upgrade` under a lock (test processes running at once share it); `seed_database` copies it into a new
    PREFECT_HOME. A server started on an empty database spends about half its start-up migrating it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            home = path.with_name(path.name + ".home")
            env = {**os.environ, "PREFECT_HOME": str(home)}  # SQLite in `home`, whatever database is named here
            for name in (
                "PREFECT_API_URL",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                "PREFECT_API_DATABASE_CONNECTION_URL",
            ):
                env.pop(name, None)
            done = subprocess.run(
                [*_prefect_cli(), "server", "database", "upgrade", "-y"],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if done.returncode != 0:
                raise RuntimeError(f"prefect server database upgrade failed:\n{done.stdout}{done.stderr}"[-3000:])
            os.replace(home / "prefect.db", path)
            shutil.rmtree(home, ignore_errors=True)
    return path


def seed_database(home: Path, template: Path | None) -> None:
    """Give the Prefect home `home` a copy of the migrated database `template` (`migrated_database`), unless it
    has a database already (a server started again keeps its own)."""
    target = home / "prefect.db"
    if template is None or target.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    partial = home / "prefect.db.seeding"
    shutil.copyfile(template, partial)
    os.replace(partial, target)


@contextlib.contextmanager
def prefect_server(
    home: Path,
    timeout: float = 240,
    port: int | None = None,
    env: dict[str, str] | None = None,
    database_template: Path | None = None,
) -> Iterator[str]:
    """Run `prefect server start` (SQLite in `home`, unless `env` names another database) on `port` or a free
    loopback port; yield its API URL. Started again with the same home and port, it is the same server after a
    restart. A free port lost to another process before the server bound it is tried again with another one
    (a `port` given is not: `PortTaken`). `database_template`: a migrated database to start from
    (`migrated_database`) when `home` has none yet."""
    home.mkdir(parents=True, exist_ok=True)
    seed_database(home, database_template)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_URL": "",
        **(env or {}),
    }
    log = home / "server.log"
    for attempt in range(1 if port else 3):
        chosen = port or free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(chosen)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{chosen}/api"
        try:
            _wait_healthy(f"{url}/health", proc, timeout, log)
            _check_listening(proc, chosen, log)
        except PortTaken:
            _stop(proc)
            if port or attempt == 2:
                raise
            continue
        except BaseException:
            _stop(proc)
            raise
        try:
            yield url
        finally:
            _stop(proc)
        return


class PortTaken(RuntimeError):
    """Another process answered on the port a server of ours was started on (a free port lost to a race)."""


def _check_listening(proc: subprocess.Popen, port: int, log: Path) -> None:
    """The healthy server on `port` is `proc` (or a child of it), not another process that took the port between
    `free_port()` and the bind: two pytest processes start servers at the same time, and whichever answers on the
    port would otherwise be taken for ours."""
    import psutil

    root = psutil.Process(proc.pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if any(
                c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                for c in process.net_connections("tcp")
            ):
                return
    raise PortTaken(f"port {port} answers, but not from the server started there (pid {proc.pid}); see {log}")


@contextlib.contextmanager
def prefect_worker(
    api_url: str,
    pool: str,
    worker_type: str,
    env: dict[str, str],
    log: Path,
    extra_args: tuple[str, ...] = (),
    query_seconds: float | None = 2,
) -> Iterator[subprocess.Popen]:
    """Run `prefect worker start` in its own session (so SIGTERM reaches it, see shared notes); it polls every
    `query_seconds` (None: the worker type's default). Each poll costs the Prefect server 40-70 ms of CPU (it
    marks the pool's queues and deployments ready): every 2 s, not every second, halves what a worker costs it.
    Its heartbeat is Prefect's default (30 s): each one is a write to the server's database, which SQLite lets
    one writer do at a time; with every worker of the suite beating every 5 s, a full run saw a flow-run create
    answered 503 ("database is locked") through all of Prefect's client retries."""
    worker_env = {**os.environ, **env, "PREFECT_API_URL": api_url}
    worker_env.pop("PREFECT_WORKER_QUERY_SECONDS", None)
    if query_seconds is not None:
        worker_env["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
    with open(log, "ab") as out:  # appended: a worker started again keeps the earlier lines of the same log
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


class FlakyProxy:
    """A TCP proxy on a free loopback port in front of `target` ("host:port") that tests can take down: while
    down, open connections are cut and new ones are closed at once, as when a service is unreachable.

    Use as ``with FlakyProxy("127.0.0.1:9000") as proxy: ... proxy.down() ... proxy.up()``; `url` is
    ``http://127.0.0.1:<port>``."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._available = threading.Event()
        self._available.set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def __enter__(self) -> FlakyProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, name="flaky-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        self._cut()

    def down(self) -> None:
        self._available.clear()
        self._cut()

    def up(self) -> None:
        self._available.set()

    def _cut(self) -> None:
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._available.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._open -= {source, sink}


class AppServer:
    """Serve an ASGI app with uvicorn on a free loopback port, in a thread, while entered (for the test fakes)."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = 0

    def __enter__(self) -> AppServer:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="critical", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

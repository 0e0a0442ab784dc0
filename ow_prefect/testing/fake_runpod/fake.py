"""`FakeRunPod`: the server object a test enters, its test controls (stock, injected faults, stalled boots,
preemption) and the pod routes' handlers; its rooms are `spec`, `catalog`, `pods`, `logs`, `volumes` and `app` (see the
package's docstring)."""

import contextlib
import json
import re
import secrets
import signal
import socket
import string
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import uvicorn

from ow_prefect.testing.fake_gpus import FakeGpus
from ow_prefect.testing.fake_runpod.app import Routes, _Gateway
from ow_prefect.testing.fake_runpod.catalog import (
    CLOUDS,
    DEFAULT_DATA_CENTER,
    DEFAULT_STOCK,
    GPU_TYPES,
    HOST_CUDA_VERSION,
    Catalog,
    StockEntry,
    _list_price,
)
from ow_prefect.testing.fake_runpod.logs import LogStreams
from ow_prefect.testing.fake_runpod.pods import (
    FakePod,
    PodSupervisor,
    _alive,
    _map_ports,
    _now,
    _private_port,
    _terminate_process_groups,
    default_image_env,
)
from ow_prefect.testing.fake_runpod.spec import Problem, _check_create_rules, _check_ports, spec_schemas
from ow_prefect.testing.fake_runpod.volumes import FakeVolume, NetworkVolumes

# The fields a PATCH may change, by their JSON name (mounts aside: an empty one changes nothing).
PATCHABLE_FIELDS = {
    "name": "name",
    "image": "image",
    "args": "args",
    "disk": "disk",
    "env": "env",
    "ports": "ports",
    "registry": "registry",
    "locked": "locked",
    "globalNetworking": "global_networking",
}


@dataclass
class Fault:
    method: str
    path_pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None
    lose_response: bool
    detail: str | None

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and method == self.method and bool(self.path_pattern.search(path))

    def problem(self) -> Problem:
        headers = None if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return Problem(self.status, self.detail or f"injected fault: {HTTPStatus(self.status).phrase}", headers=headers)


class FakeRunPod(Catalog, LogStreams, NetworkVolumes, PodSupervisor, Routes):
    """RunPod's REST API v2 for pods and the GPU catalog, served on a free loopback port while entered.

    `api_key` is the one bearer token it accepts; `page_size` pages `GET /v2/pods` (None: one page);
    `default_stock` starts it with DEFAULT_STOCK. The timings default to RunPod-like values and tests pass
    smaller ones: `boot_seconds` from create (or start) to a runtime, `restart_backoff` from a command's exit to
    its restart, `kill_grace` from SIGTERM to SIGKILL, `log_follow_seconds` for how long a log stream waits for
    new lines before it ends. `image_env` is the environment every container starts with (default: this
    process's `IMAGE_VARIABLES`, this interpreter's directory first on PATH). `entrypoint` plays the image's
    ENTRYPOINT: a script every container runs with the pod's `args` as its arguments (e.g. docker/entrypoint.sh;
    None: `args` alone). `gpus` (ow_prefect/testing/fake_gpus.py) is what GPU pods see through `nvidia-smi`: a
    test breaks a GPU type there.

    While entered, `url` is the API's base (".../v2"). For assertions: `pods` (id -> FakePod, deleted ones
    included), `stock` ((GPU id, cloud, data center) -> StockEntry) and `requests` ((method, path, JSON body or
    None), in the order received). Leaving the context kills every pod's processes and stops the server.
    """

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        page_size: int | None = None,
        default_stock: bool = True,
        boot_seconds: float = 0.5,
        restart_backoff: float = 1.0,
        kill_grace: float = 3.0,
        log_follow_seconds: float = 1.0,
        port: int = 0,
        image_env: dict[str, str] | None = None,
        entrypoint: str | None = None,
    ) -> None:
        self.api_key = api_key
        self.port = port
        self.image_env = dict(default_image_env() if image_env is None else image_env)
        self.entrypoint = entrypoint
        self.gpus = FakeGpus({gpu_id: spec[1] for gpu_id, spec in GPU_TYPES.items()}, HOST_CUDA_VERSION)
        self.page_size = page_size
        self.boot_seconds = boot_seconds
        self.restart_backoff = restart_backoff
        self.kill_grace = kill_grace
        self.log_follow_seconds = log_follow_seconds
        self.url = ""
        self.pods: dict[str, FakePod] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.stock: dict[tuple[str, str, str], StockEntry] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.request_times: list[float] = []  # time.monotonic() of each entry in `requests`
        self._stalled_boots = 0
        self._lock = threading.RLock()
        self._faults: list[Fault] = []
        self._closed = False
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        if default_stock:
            for entry in DEFAULT_STOCK:
                self.set_stock(*entry)

    # Lifecycle

    def __enter__(self) -> "FakeRunPod":
        self._workdir = tempfile.TemporaryDirectory(prefix="fake-runpod-")
        listener = socket.socket()
        listener.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(
            _Gateway(self._build_app(), self),
            http="h11",  # _drop_connection relies on uvicorn's h11 protocol
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener]}, name="fake-runpod", daemon=True
        )
        self._thread.start()
        self._wait_until_serving()
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}/v2"
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._closed = True
            processes = [pod.process for pod in self.pods.values() if _alive(pod.process)]
        _terminate_process_groups(processes, self.kill_grace)
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._workdir.cleanup()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("FakeRunPod's server did not start")
            time.sleep(0.01)

    # Test controls

    def set_stock(
        self,
        gpu_id: str,
        count: int,
        cloud: str = "SECURE",
        data_center: str = DEFAULT_DATA_CENTER,
        price_per_hour: float | None = None,
    ) -> None:
        """Set how many GPUs of `gpu_id` are free in `cloud` and `data_center`; the price defaults to the
        entry's current one, else a list price from the GPU's memory."""
        if gpu_id not in GPU_TYPES:
            raise ValueError(f"unknown GPU type id {gpu_id!r}; known ids are the keys of GPU_TYPES")
        if cloud not in CLOUDS:
            raise ValueError(f"cloud must be one of {CLOUDS}, not {cloud!r}")
        with self._lock:
            current = self.stock.get((gpu_id, cloud, data_center))
            if price_per_hour is None:
                price_per_hour = current.price_per_hour if current else _list_price(gpu_id, cloud)
            self.stock[(gpu_id, cloud, data_center)] = StockEntry(count, price_per_hour)

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int = 500,
        times: int = 1,
        retry_after: int | None = None,
        lose_response: bool = False,
        detail: str | None = None,
    ) -> None:
        """Make the next `times` requests whose method is `method` and whose path (e.g. "/v2/pods") contains a
        match of `path_regex` fail with `status` (and `Retry-After` when given), before auth and handling.
        With `lose_response`, the request is handled as usual but the connection closes before any response,
        which httpx reports as `httpx.RemoteProtocolError`."""
        fault = Fault(method.upper(), re.compile(path_regex), status, times, retry_after, lose_response, detail)
        with self._lock:
            self._faults.append(fault)

    def reset(self) -> None:
        """Forget the faults injected, the boots stalled that no request has used up yet and the GPU types broken
        (for a fake shared by tests one after another)."""
        with self._lock:
            self._faults.clear()
            self._stalled_boots = 0
            self.gpus.clear()

    def stall_boots(self, times: int = 1) -> None:
        """Make the next `times` pods created hang in their image pull: they stay listed as RUNNING with no
        runtime and no container, the way a pod stuck starting looks, until they are deleted."""
        with self._lock:
            self._stalled_boots += times

    def peak_pods(self) -> int:
        """The most pods that existed at once (created and not yet deleted), from every pod's create and delete
        times: what a worker's concurrency limit must bound."""
        with self._lock:
            events = [(pod.created_at, 1) for pod in self.pods.values()]
            events += [(pod.deleted_at, -1) for pod in self.pods.values() if pod.deleted_at]
        peak = live = 0
        for _, change in sorted(events):  # at the same instant a delete (-1) counts before a create
            live += change
            peak = max(peak, live)
        return peak

    def delete(self, pod_id: str) -> None:
        """Delete a pod as `DELETE /pods/{podId}` does (a test's clean-up of a pod its worker left)."""
        self._delete_pod(pod_id)

    def preempt(self, pod_id: str) -> None:
        """End a pod the way a spot interruption does: SIGTERM to its processes and status EXITED at once, then
        TERMINATED when they are gone (SIGKILL after `kill_grace`). It is not restarted and stays listed."""
        with self._lock:
            pod = self.pods[pod_id]
            if pod.status != "RUNNING":
                raise ValueError(f"pod {pod_id} is {pod.status}: only a RUNNING pod can be preempted")
            process = self._stop_pod(pod, reason="pod preempted: the host reclaimed its spot instance")
        threading.Thread(target=self._finish_preemption, args=(pod, process), daemon=True).start()

    def _finish_preemption(self, pod: FakePod, process: subprocess.Popen | None) -> None:
        self._terminate(process)
        with self._lock:
            if pod.status == "EXITED":
                pod.status = "TERMINATED"
                self._log(pod, "system", "pod terminated")

    def _record_request(self, method: str, path: str, body: bytes) -> Fault | None:
        """Record a request as received and return the injected fault it triggers, if any."""
        with self._lock:
            self.requests.append((method, path, _json_or_none(body)))
            self.request_times.append(time.monotonic())
            fault = next((fault for fault in self._faults if fault.matches(method, path)), None)
            if fault:
                fault.remaining -= 1
            return fault

    # Pods

    def _create_pod(self, body: Any) -> dict[str, Any]:
        self._validate("CreatePodRequest", body)
        _check_create_rules(body)
        if "templateId" in body:
            raise Problem(404, f"template {body['templateId']!r} not found (FakeRunPod has no templates)")
        with self._lock:
            pod = self._new_pod(body)
            if self._stalled_boots:
                self._stalled_boots -= 1
                pod.boot_stalled = True
            self.pods[pod.id] = pod
            self._log(pod, "system", f"pod created on {pod.data_center_id} ({pod.cloud})")
            self._start_container(pod)
            return self._pod_json(pod)

    def _new_pod(self, body: dict[str, Any]) -> FakePod:
        pod_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(14))
        data_center_id, price, stock_key = self._place(body)
        ports = list(body.get("ports", []))
        env = dict(body.get("env", {}))
        if body.get("startJupyter"):
            env.setdefault("JUPYTER_PASSWORD", secrets.token_urlsafe(12))
        cpu = body.get("cpu")
        return FakePod(
            id=pod_id,
            name=body["name"],
            image=body.get("image", ""),
            args=body.get("args", ""),
            disk=body.get("disk", 50),
            ports=ports,
            env=env,
            registry=body.get("registry"),
            mounts=body.get("mounts", {}),
            global_networking=body.get("globalNetworking", False),
            gpu={"id": body["gpu"]["id"], "count": body["gpu"].get("count", 1)} if "gpu" in body else None,
            cpu={**cpu, "memory": 2 * cpu["vcpuCount"]} if cpu else None,  # RunPod derives it from the flavor
            cloud=body.get("cloud", "SECURE"),
            data_center_id=data_center_id,
            price=price,
            stock_key=stock_key,
            api_key=f"rpa_pod_{pod_id}_{secrets.token_hex(8)}",
            workdir=Path(tempfile.mkdtemp(prefix=f"{pod_id}-", dir=self._workdir.name)),
            port_map=_map_ports(ports, {}),
        )

    def _list_pods(self, cursor: str | None) -> dict[str, Any]:
        with self._lock:
            ids = list(self.pods)
            if cursor is not None and cursor not in self.pods:
                raise Problem(400, f"invalid cursor {cursor!r}: pass a pagination.nextCursor from a previous page")
            start = ids.index(cursor) + 1 if cursor else 0
            remaining = [pod for pod in list(self.pods.values())[start:] if pod.deleted_at is None]
            page = remaining[: self.page_size] if self.page_size else remaining
            body: dict[str, Any] = {"pods": [self._pod_json(pod) for pod in page]}
            if len(remaining) > len(page):
                body["pagination"] = {"nextCursor": page[-1].id}
            return body

    def _get_pod(self, pod_id: str) -> dict[str, Any]:
        with self._lock:
            return self._pod_json(self._visible_pod(pod_id))

    def _update_pod(self, pod_id: str, body: Any) -> dict[str, Any]:
        self._validate("UpdatePodRequest", body)
        if "templateId" in body:
            raise Problem(404, f"template {body['templateId']!r} not found (FakeRunPod has no templates)")
        _check_ports(body.get("ports", []))
        with self._lock:
            pod = self._visible_pod(pod_id)
            for key, attribute in PATCHABLE_FIELDS.items():
                if key in body:
                    setattr(pod, attribute, body[key])
            if body.get("mounts"):  # an empty `mounts` leaves the mount as it is
                pod.mounts = body["mounts"]
            pod.port_map = _map_ports(pod.ports, pod.port_map)
            return self._pod_json(pod)

    def _delete_pod(self, pod_id: str) -> None:
        with self._lock:
            process = self._end_pod(self._visible_pod(pod_id))
        self._terminate(process)

    def _pod_action(self, pod_id: str, body: Any) -> dict[str, Any] | None:
        self._validate("PodActionRequest", body)
        action = body["action"]
        with self._lock:
            pod = self._visible_pod(pod_id)
            if action not in _allowed_actions(pod):
                locked = " and locked" if pod.locked else ""
                raise Problem(409, f"cannot {action} pod {pod_id}: it is {pod.status}{locked}")
            apply = {
                "start": self._start_pod,
                "stop": self._stop_pod,
                "restart": self._stop_for_restart,
                "terminate": self._end_pod,
            }
            process = apply[action](pod)
        self._terminate(process)
        if action == "terminate":
            return None
        with self._lock:
            # Only now that the old container is gone may the new one bind the same ports.
            if action == "restart" and pod.status == "RUNNING":
                self._start_container(pod)
            return self._pod_json(pod)

    # Each of these runs under the lock and returns the process the caller terminates once the lock is released.

    def _start_pod(self, pod: FakePod) -> None:
        self._acquire_stock(pod)
        pod.status = "RUNNING"
        pod.stopped_at = None
        self._log(pod, "system", "pod started")
        self._start_container(pod)

    def _stop_pod(self, pod: FakePod, reason: str = "pod stopped") -> subprocess.Popen | None:
        process = self._stop_container(pod)
        pod.status = "EXITED"
        pod.stopped_at = _now()
        self._release_stock(pod)
        self._log(pod, "system", reason)
        return process

    def _stop_for_restart(self, pod: FakePod) -> subprocess.Popen | None:
        process = self._stop_container(pod)
        pod.restarts += 1
        self._log(pod, "system", "container restarting")
        return process

    def _end_pod(self, pod: FakePod) -> subprocess.Popen | None:
        process = self._stop_container(pod)
        self._release_stock(pod)
        pod.status = "TERMINATED"
        pod.deleted_at = _now()
        self._log(pod, "system", "pod terminated")
        return process

    def _visible_pod(self, pod_id: str) -> FakePod:
        pod = self.pods.get(pod_id)
        if pod is None or pod.deleted_at is not None:
            raise Problem(404, f"pod {pod_id} not found")
        return pod

    def _validate(self, schema_name: str, body: Any) -> None:
        errors = spec_schemas().errors(schema_name, body)
        if errors:
            raise Problem(422, "Request validation failed: " + "; ".join(errors), errors=errors)

    # JSON shapes

    def _pod_json(self, pod: FakePod) -> dict[str, Any]:
        running = pod.status == "RUNNING"
        return {
            "id": pod.id,
            "name": pod.name,
            "image": pod.image,
            "args": pod.args,
            "disk": pod.disk,
            "ports": list(pod.ports),
            "env": dict(pod.env),
            "registry": pod.registry,
            "status": pod.status,
            "actions": _allowed_actions(pod),
            "mounts": pod.mounts,
            **({"gpu": dict(pod.gpu)} if pod.gpu else {"cpu": dict(pod.cpu)}),
            "cloud": pod.cloud,
            "dataCenterId": pod.data_center_id,
            "cudaVersion": HOST_CUDA_VERSION if pod.gpu else None,
            "ssh": _ssh_json(pod),
            "template": None,
            "cost": pod.price if running else 0.0,
            "locked": pod.locked,
            "globalNetworking": {"enabled": pod.global_networking}
            | ({"internalDns": f"{pod.id}.runpod.internal"} if pod.global_networking else {}),
            "runtime": _runtime_json(pod) if running and pod.up_since else None,
            "createdAt": _timestamp(pod.created_at),
            "startedAt": _timestamp(pod.started_at) if pod.started_at else None,
        }


def _allowed_actions(pod: FakePod) -> list[str]:
    allowed = {
        "RUNNING": ["stop", "restart", "terminate"],
        "EXITED": ["start", "terminate"],
    }.get(pod.status, [])
    # Locked pods cannot be stopped or reset.
    return [action for action in allowed if not (pod.locked and action in ("stop", "restart"))]


def _ssh_json(pod: FakePod) -> dict[str, Any]:
    user = f"{pod.id}-fake"
    proxy = {"host": "ssh.runpod.io", "port": 22, "username": user, "command": f"ssh {user}@ssh.runpod.io"}
    port = pod.port_map.get("22/tcp") if pod.status == "RUNNING" and pod.up_since else None
    direct = None
    if port:
        direct = {"host": "127.0.0.1", "port": port, "username": "root", "command": f"ssh root@127.0.0.1 -p {port}"}
    return {"proxy": proxy, "direct": direct}


def _runtime_json(pod: FakePod) -> dict[str, Any]:
    ports = [
        {"private": _private_port(spec), "public": public, "type": spec.split("/")[1], "ip": "127.0.0.1"}
        for spec, public in pod.port_map.items()
    ]
    runtime = {
        "uptime": int((_now() - pod.up_since).total_seconds()),
        "cpu": {"util": 0},
        "memory": {"util": 0},
        "ports": ports,
    }
    if pod.gpu:
        runtime["gpus"] = [{"util": 0, "memoryUtil": 0} for _ in range(pod.gpu["count"])]
    return runtime


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


@contextlib.contextmanager
def fake_runpod(**options: Any) -> Iterator[FakeRunPod]:
    """`FakeRunPod(**options)` as a context manager function, for fixtures."""
    with FakeRunPod(**options) as fake:
        yield fake


def main(argv: list[str] | None = None) -> int:
    """`python -m ow_prefect.testing.fake_runpod [--port N] [--api-key KEY]`: serve until Ctrl-C or SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ow_prefect.testing.fake_runpod",
        description="RunPod's REST API v2 on loopback; each pod is a local process running the pod's command with "
        "the image's environment (this process's PATH, OW_HOME, HF_HOME and the other IMAGE_VARIABLES) plus the env it "
        "was created with (docs/runpod.md, 'Try it on the fake').",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--api-key", default="fake-key", help="the one bearer token it accepts (default: fake-key)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeRunPod(api_key=args.api_key, port=args.port) as fake:
        print(f"FakeRunPod serving {fake.url} (api key {args.api_key!r}); Ctrl-C stops it and its pods", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0

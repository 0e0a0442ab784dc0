"""A local fake of RunPod's REST API v2 (pods and the GPU catalog), for tests and for trying the RunPod worker
without an account or a GPU.

    import httpx
    from ow_prefect.testing.fake_runpod import FakeRunPod

    with FakeRunPod(api_key="test-key") as fake:
        api = httpx.Client(base_url=fake.url, headers={"Authorization": "Bearer test-key"})
        pod = api.post("/pods", json={"name": "job-1", "image": "any", "gpu": {"id": "NVIDIA RTX A6000"},
                                      "args": "python -m my_job"}).json()
        fake.preempt(pod["id"])          # or fake.inject("POST", r"/pods$", status=429, retry_after=3)

The server answers the way `runpod-openapi-v2.json` (RunPod's spec, shipped next to this module) and RunPod's
observed behaviour say: bearer auth, problem+json errors, strict bodies (unknown fields are a 422 naming them),
HTTP 400 with RunPod's own sentence when no GPU is left, `RUNNING` with `runtime: null` right after a create.

A pod is a local process. Its `args` run under `bash -c` in a scratch directory (also its `HOME`), with what a
container of the image would have and nothing more: the image's environment (`image_env`; by default the few
variables in `IMAGE_VARIABLES` that this machine, playing the image, has set — the interpreter's `PATH`,
ow_prefect's home and vLLM environment, the Hugging Face cache and offline switches), the env the client sent
and RunPod's injected `RUNPOD_*` variables. The test's own environment (its keys included) is not inherited,
so a test passes only when the worker really sends a pod what it needs. As on RunPod, a command that exits is
restarted and the pod keeps billing until it is deleted or terminated; without `args` (the image's default
command) nothing runs and the pod just stays up. Each exposed port is mapped to a free loopback port, shown in
the pod's `runtime.ports` and published as `RUNPOD_TCP_PORT_<private port>` — for http ports too, because
locally the process has to bind the public port itself.

Where the fake departs from the spec, and why:
- Right after a create a pod is `RUNNING` with `runtime: null`, as observed live, not `PROVISIONING`.
- `preempt()` ends a pod as a spot interruption would, although v2 cannot rent spot pods yet: a worker must
  cope with a pod that ends under it anyway.
- `GET /v2/pods` pages with `?cursor=` and `pagination.nextCursor` only when built with `page_size`: the spec
  has no pagination yet, RunPod's notes say to follow `nextCursor` when present.
- There are no templates or clusters: a `templateId` is a 404, other spec routes are a 501. Network volumes are
  read-only (`add_network_volume()` makes one; GET lists and reads them) and a pod mounting one is placed in its
  data center. A mount path does not exist on this machine: the pod's env values that start with it point into the
  volume's local folder instead, which every pod mounting the volume shares.
- Every host reports CUDA 12.8; the catalog's `countryCodes` filter is a 501.
- A PATCH of container settings takes effect at the container's next start (restart action or exit).
"""

import asyncio
import contextlib
import json
import os
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, reduce
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from ow_prefect.testing.servers import free_port

SPEC_FILE = Path(__file__).with_name("runpod-openapi-v2.json")
SPEC_URI = "urn:runpod:openapi-v2"
CAPACITY_DETAIL = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
HOST_CUDA_VERSION = "12.8"
DEFAULT_DATA_CENTER = "US-TX-3"
CLOUDS = ("SECURE", "COMMUNITY")
AVAILABILITY_LEVELS = ("NONE", "LOW", "MEDIUM", "HIGH")
MAX_GPUS_PER_POD = {"secure": 8, "community": 4}
CPU_PRICE_PER_VCPU = 0.03
VCPUS_PER_GPU = 8
LOG_LINES_KEPT = 10_000
PORT_PATTERN = re.compile(r"(\d{1,5})/(http|tcp)")
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

# GPU id -> (display name, memory in GB, serverless pool), from RunPod's GPU types page.
GPU_TYPES: dict[str, tuple[str, int, str | None]] = {
    "AMD Instinct MI300X OAM": ("MI300X", 192, None),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe", 80, "AMPERE_80"),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM", 80, "AMPERE_80"),
    "NVIDIA A30": ("A30", 24, None),
    "NVIDIA A40": ("A40", 48, "AMPERE_48"),
    "NVIDIA B200": ("B200", 180, None),
    "NVIDIA B300 SXM6 AC": ("B300", 288, None),
    "NVIDIA GeForce RTX 3070": ("RTX 3070", 8, None),
    "NVIDIA GeForce RTX 3080": ("RTX 3080", 10, None),
    "NVIDIA GeForce RTX 3080 Ti": ("RTX 3080 Ti", 12, None),
    "NVIDIA GeForce RTX 3090": ("RTX 3090", 24, "AMPERE_24"),
    "NVIDIA GeForce RTX 3090 Ti": ("RTX 3090 Ti", 24, None),
    "NVIDIA GeForce RTX 4070 Ti": ("RTX 4070 Ti", 12, None),
    "NVIDIA GeForce RTX 4080": ("RTX 4080", 16, None),
    "NVIDIA GeForce RTX 4080 SUPER": ("RTX 4080 SUPER", 16, None),
    "NVIDIA GeForce RTX 4090": ("RTX 4090", 24, "ADA_24"),
    "NVIDIA GeForce RTX 5080": ("RTX 5080", 16, None),
    "NVIDIA GeForce RTX 5090": ("RTX 5090", 32, None),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 80, "ADA_80_PRO"),
    "NVIDIA H100 NVL": ("H100 NVL", 94, None),
    "NVIDIA H100 PCIe": ("H100 PCIe", 80, "ADA_80_PRO"),
    "NVIDIA H200": ("H200 SXM", 141, "HOPPER_141"),
    "NVIDIA H200 NVL": ("NVIDIA H200 NVL", 143, None),
    "NVIDIA L4": ("L4", 24, "AMPERE_24"),
    "NVIDIA L40": ("L40", 48, "ADA_48_PRO"),
    "NVIDIA L40S": ("L40S", 48, "ADA_48_PRO"),
    "NVIDIA RTX 2000 Ada Generation": ("RTX 2000 Ada", 16, "AMPERE_16"),
    "NVIDIA RTX 4000 Ada Generation": ("RTX 4000 Ada", 20, "AMPERE_16"),
    "NVIDIA RTX 4000 SFF Ada Generation": ("RTX 4000 Ada SFF", 20, None),
    "NVIDIA RTX 5000 Ada Generation": ("RTX 5000 Ada", 32, None),
    "NVIDIA RTX 6000 Ada Generation": ("RTX 6000 Ada", 48, "ADA_48_PRO"),
    "NVIDIA RTX A2000": ("RTX A2000", 6, None),
    "NVIDIA RTX A4000": ("RTX A4000", 16, "AMPERE_16"),
    "NVIDIA RTX A4500": ("RTX A4500", 20, "AMPERE_16"),
    "NVIDIA RTX A5000": ("RTX A5000", 24, "AMPERE_24"),
    "NVIDIA RTX A6000": ("RTX A6000", 48, "AMPERE_48"),
    "NVIDIA RTX PRO 4500 Blackwell": ("RTX PRO 4500", 32, None),
    "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition": ("RTX PRO 6000 MaxQ", 96, None),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition MIG 1g.24gb": ("PRO 6000 MIG 24GB", 24, None),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition MIG 2g.48gb": ("PRO 6000 MIG 48GB", 48, None),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": ("RTX PRO 6000", 96, None),
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": ("RTX PRO 6000 WK", 96, None),
    "Tesla V100-PCIE-16GB": ("Tesla V100", 16, None),
    "Tesla V100-SXM2-16GB": ("V100 SXM2", 16, None),
    "Tesla V100-SXM2-32GB": ("V100 SXM2 32GB", 32, None),
}
DATA_CENTER_NAMES = {"US-TX-3": "US Texas 3", "US-KS-2": "US Kansas 2", "EU-RO-1": "Europe Romania 1"}
# (GPU id, free units, cloud, data center, USD per GPU-hour): the stock a fresh fake starts with.
DEFAULT_STOCK = [
    ("NVIDIA GeForce RTX 4090", 4, "SECURE", "US-TX-3", 0.59),
    ("NVIDIA GeForce RTX 4090", 4, "COMMUNITY", "EU-RO-1", 0.34),
    ("NVIDIA RTX A6000", 4, "SECURE", "US-TX-3", 0.49),
    ("NVIDIA RTX A6000", 3, "COMMUNITY", "EU-RO-1", 0.33),
    ("NVIDIA A100 80GB PCIe", 4, "SECURE", "US-TX-3", 1.64),
    ("NVIDIA A100 80GB PCIe", 2, "COMMUNITY", "EU-RO-1", 1.19),
    ("NVIDIA H100 80GB HBM3", 8, "SECURE", "US-TX-3", 2.69),
    ("NVIDIA H100 80GB HBM3", 2, "COMMUNITY", "EU-RO-1", 1.99),
]


class SpecSchemas:
    """The request and response schemas of RunPod's spec, checked the way RunPod's strict API checks bodies."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(SPEC_URI, resource)
        self._validators: dict[str, Draft202012Validator] = {}

    def errors(self, schema_name: str, instance: Any) -> list[str]:
        """Each violation of `#/components/schemas/<schema_name>` as `<json path>: <message>`; empty if valid."""
        messages = []
        for error in sorted(self._validator(schema_name).iter_errors(instance), key=lambda e: e.json_path):
            if error.validator in ("unevaluatedProperties", "additionalProperties"):
                messages += [
                    f"{error.json_path}: additional properties {name!r} not allowed"
                    for name in self._undeclared(error.schema, error.instance)
                ]
            else:
                messages.append(f"{error.json_path}: {error.message}")
        return messages

    def properties_of(self, schema_name: str) -> set[str]:
        """The field names that `schema_name` or any schema in its allOf chain declares."""
        return self._declared({"$ref": f"#/components/schemas/{schema_name}"})

    def _validator(self, schema_name: str) -> Draft202012Validator:
        if schema_name not in self._validators:
            schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
            self._validators[schema_name] = Draft202012Validator(schema, registry=self._registry)
        return self._validators[schema_name]

    def _undeclared(self, schema: dict[str, Any], instance: dict[str, Any]) -> list[str]:
        declared = self._declared(schema)
        return [name for name in instance if name not in declared]

    def _declared(self, schema: dict[str, Any]) -> set[str]:
        names = set(schema.get("properties", ()))
        for part in schema.get("allOf", ()):
            names |= self._declared(part)
        if "$ref" in schema:
            target = reduce(lambda node, key: node[key], schema["$ref"].removeprefix("#/").split("/"), self.spec)
            names |= self._declared(target)
        return names


@cache
def spec_schemas() -> SpecSchemas:
    """The schemas of the shipped spec, loaded once per process."""
    return SpecSchemas(json.loads(SPEC_FILE.read_text()))


class Problem(Exception):
    """An error answered as problem+json (RFC 9457), as RunPod answers every error."""

    def __init__(
        self, status: int, detail: str, *, errors: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        return JSONResponse(body, self.status, headers=self.headers, media_type="application/problem+json")


@dataclass
class StockEntry:
    """Free GPUs of one type in one cloud and data center, and what one of them costs per hour."""

    count: int
    price_per_hour: float


@dataclass
class LogLine:
    seq: int
    ts: datetime
    source: Literal["container", "system"]
    line: str

    def sse_event(self) -> str:
        ts = self.ts.isoformat(timespec="microseconds").replace("+00:00", "Z")
        data = json.dumps({"ts": ts, "source": self.source, "line": self.line})
        return f"id: {ts}/{self.seq:012d}\ndata: {data}\n\n"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FakePod:
    """The fake's record of one pod. Tests read it; the server changes it under the fake's lock."""

    id: str
    name: str
    image: str
    args: str
    disk: int
    ports: list[str]
    env: dict[str, str]
    registry: str | None
    mounts: dict[str, Any]
    global_networking: bool
    gpu: dict[str, Any] | None
    cpu: dict[str, Any] | None
    cloud: str
    data_center_id: str
    price: float  # USD per hour for the whole pod, billed while it is RUNNING
    stock_key: tuple[str, str, str] | None  # the stock its GPUs came from; None for a CPU pod
    api_key: str  # the pod-scoped RUNPOD_API_KEY; the fake does not accept it
    workdir: Path
    port_map: dict[str, int]  # "8000/http" -> public loopback port
    status: str = "RUNNING"
    locked: bool = False
    holds_stock: bool = True
    process: subprocess.Popen | None = None  # the latest container process, kept after it ends
    restarts: int = 0
    generation: int = 0  # bumped whenever the container is stopped or started, to retire old supervisors
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    up_since: datetime | None = None  # when the current container started; None while it is not up
    deleted_at: datetime | None = None
    stopped_at: datetime | None = None  # when it was last stopped (EXITED, not billed); None while it runs
    boot_stalled: bool = False  # its image pull never finishes: no container, no runtime, until deleted
    logs: list[LogLine] = field(default_factory=list)  # a list, so tests can read it while lines arrive
    next_log_seq: int = 1


@dataclass
class FakeVolume:
    """A network volume: a folder on this machine shared by every pod that mounts it."""

    id: str
    name: str
    size: int
    data_center: str
    folder: Path

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "dataCenter": self.data_center, "type": "STANDARD"}


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


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as error:
        raise Problem(400, f"request body is not valid JSON: {error}") from error


@dataclass
class AvailabilityFilters:
    """The catalog's `include=AVAILABILITY` query, checked."""

    products: list[str]
    count: int
    cloud: str
    cuda_versions: list[str]
    min_cuda_version: str | None


def _availability_filters(
    include: str | None = None,
    product: str | None = None,
    count: Annotated[int | None, Query(ge=1)] = None,
    cloud: Literal["SECURE", "COMMUNITY"] | None = None,
    countryCodes: str | None = None,  # noqa: N803 (the spec's parameter names)
    cudaVersions: str | None = None,  # noqa: N803
    minCudaVersion: Annotated[str | None, Query(pattern=r"^\d+(\.\d+)?$")] = None,  # noqa: N803
) -> AvailabilityFilters | None:
    """None without `include`; RunPod's 400s for filters that need `include=AVAILABILITY` or `product`."""
    includes, products, cuda_versions = _csv(include), _csv(product), _csv(cudaVersions)
    _check_enum("include", includes, ["AVAILABILITY"])
    _check_enum("product", products, ["POD", "CLUSTER", "SERVERLESS"])
    if not includes:
        given = {"product": product, "count": count, "cloud": cloud, "cudaVersions": cudaVersions}
        given |= {"minCudaVersion": minCudaVersion, "countryCodes": countryCodes}
        misplaced = [name for name, value in given.items() if value is not None]
        if misplaced:
            raise Problem(400, f"{', '.join(misplaced)}: valid only with include=AVAILABILITY")
        return None
    if not products:
        raise Problem(400, "include=AVAILABILITY requires product (POD, CLUSTER or SERVERLESS)")
    if cuda_versions and minCudaVersion:
        raise Problem(400, "cudaVersions and minCudaVersion are mutually exclusive")
    if any(not re.fullmatch(r"\d+\.\d+", version) for version in cuda_versions):
        raise Problem(422, f"cudaVersions must be major.minor versions, got {cudaVersions!r}")
    if countryCodes is not None:
        raise Problem(501, "the countryCodes filter is not implemented by FakeRunPod")
    return AvailabilityFilters(products, count or 1, cloud or "SECURE", cuda_versions, minCudaVersion)


def _csv(value: str | None) -> list[str]:
    return [item for item in (value or "").split(",") if item]


def _check_enum(name: str, values: list[str], allowed: list[str]) -> None:
    for value in values:
        if value not in allowed:
            raise Problem(422, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


JsonBody = Annotated[Any, Depends(_json_body)]
CatalogFilters = Annotated[AvailabilityFilters | None, Depends(_availability_filters)]


# What a test machine's environment contributes to a fake pod, standing in for the image's ENV lines (the real
# images set PATH, OW_HOME, OW_VLLM_PYTHON, HF_HOME, PYTHONPATH: docker/Dockerfile). OW_TRAIN_BACKEND too: a machine
# playing a GPU image without a GPU says so once (docs/runpod.md's fake recipe exports it), as an image would.
IMAGE_VARIABLES = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "OW_HOME",
    "OW_VLLM_PYTHON",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OW_TRAIN_BACKEND",
)


class FakeRunPod:
    """RunPod's REST API v2 for pods and the GPU catalog, served on a free loopback port while entered.

    `api_key` is the one bearer token it accepts; `page_size` pages `GET /v2/pods` (None: one page);
    `default_stock` starts it with DEFAULT_STOCK. The timings default to RunPod-like values and tests pass
    smaller ones: `boot_seconds` from create (or start) to a runtime, `restart_backoff` from a command's exit to
    its restart, `kill_grace` from SIGTERM to SIGKILL, `log_follow_seconds` for how long a log stream waits for
    new lines before it ends. `image_env` is the environment every container starts with (default: this
    process's `IMAGE_VARIABLES`).

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
    ) -> None:
        self.api_key = api_key
        self.port = port
        if image_env is None:
            image_env = {name: os.environ[name] for name in IMAGE_VARIABLES if name in os.environ}
        self.image_env = dict(image_env)
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

    def add_network_volume(self, volume_id: str, data_center: str = DEFAULT_DATA_CENTER, size: int = 50) -> Path:
        """A network volume in `data_center` (while entered); returns the local folder that stands in for it."""
        folder = Path(self._workdir.name) / "volumes" / volume_id
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.volumes[volume_id] = FakeVolume(volume_id, f"volume-{volume_id}", size, data_center, folder)
        return folder

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
        """Forget the faults injected and the boots stalled that no request has used up yet (for a fake shared by
        tests one after another)."""
        with self._lock:
            self._faults.clear()
            self._stalled_boots = 0

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

    def _place(self, body: dict[str, Any]) -> tuple[str, float, tuple[str, str, str] | None]:
        """Pick where the pod runs and take its GPUs from stock: (data center, USD per hour, stock key)."""
        preferred = body.get("dataCenterIds") or []
        if "cpu" in body:
            return (preferred or [DEFAULT_DATA_CENTER])[0], CPU_PRICE_PER_VCPU * body["cpu"]["vcpuCount"], None
        preferred = self._volume_data_center(body, preferred)
        gpu = body["gpu"]
        gpu_id, count, cloud = gpu["id"], gpu.get("count", 1), body.get("cloud", "SECURE")
        if gpu_id not in GPU_TYPES:
            raise Problem(400, f"unknown GPU type id {gpu_id!r}; list valid ids with GET /v2/catalog/gpus")
        if not _cuda_accepted(gpu.get("allowedCudaVersions"), gpu.get("minCudaVersion")):
            raise Problem(400, CAPACITY_DETAIL)
        candidates = [
            key for key in self.stock if key[:2] == (gpu_id, cloud) and (not preferred or key[2] in preferred)
        ]
        candidates.sort(key=lambda key: preferred.index(key[2]) if preferred else 0)
        for key in candidates:
            if self.stock[key].count >= count:
                self.stock[key].count -= count
                return key[2], round(self.stock[key].price_per_hour * count, 4), key
        raise Problem(400, CAPACITY_DETAIL)

    def _volume_data_center(self, body: dict[str, Any], preferred: list[str]) -> list[str]:
        """A pod mounting a network volume runs in the volume's data center."""
        network = body.get("mounts", {}).get("network") or []
        if not network:
            return preferred
        volume = self.volumes.get(network[0]["volumeId"])
        if volume is None:
            raise Problem(400, f"network volume {network[0]['volumeId']!r} not found")
        if preferred and volume.data_center not in preferred:
            raise Problem(
                400, f"network volume {volume.id} is in {volume.data_center}, not in dataCenterIds {preferred}"
            )
        return [volume.data_center]

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

    def _release_stock(self, pod: FakePod) -> None:
        if pod.holds_stock and pod.stock_key:
            self.stock[pod.stock_key].count += pod.gpu["count"]
        pod.holds_stock = False

    def _acquire_stock(self, pod: FakePod) -> None:
        """Take a stopped pod's GPUs back from its data center, as RunPod does when it is started again."""
        if pod.stock_key:
            entry = self.stock[pod.stock_key]
            if entry.count < pod.gpu["count"]:
                raise Problem(400, CAPACITY_DETAIL)
            entry.count -= pod.gpu["count"]
        pod.holds_stock = True

    def _validate(self, schema_name: str, body: Any) -> None:
        errors = spec_schemas().errors(schema_name, body)
        if errors:
            raise Problem(422, "Request validation failed: " + "; ".join(errors), errors=errors)

    # Containers

    def _start_container(self, pod: FakePod) -> None:
        pod.generation += 1
        supervisor = threading.Thread(
            target=self._supervise, args=(pod, pod.generation), name=f"fake-pod-{pod.id}", daemon=True
        )
        supervisor.start()

    def _stop_container(self, pod: FakePod) -> subprocess.Popen | None:
        """Retire the pod's supervisor and return its process, if running, for the caller to terminate."""
        pod.generation += 1
        pod.up_since = None
        return pod.process if _alive(pod.process) else None

    def _terminate(self, process: subprocess.Popen | None) -> None:
        if process:
            _terminate_process_groups([process], self.kill_grace)

    def _supervise(self, pod: FakePod, generation: int) -> None:
        """Boot the container and restart it whenever its command exits, until the pod's container is stopped."""
        if pod.boot_stalled:
            with self._lock:
                self._log(pod, "system", f"pulling image {pod.image or '(the default image)'}")
            while not self._closed and pod.generation == generation:
                time.sleep(0.2)
            return
        delay = self.boot_seconds
        while True:
            time.sleep(delay)
            with self._lock:
                if self._closed or pod.generation != generation:
                    return
                process, readers = self._launch(pod)
            if process is None:
                return
            exit_code = process.wait()
            _signal_group(process, signal.SIGKILL)  # a container's leftovers die with it
            for reader in readers:
                reader.join(timeout=1)
            with self._lock:
                if self._closed or pod.generation != generation:
                    return
                pod.up_since = None
                pod.restarts += 1
                self._log(pod, "system", f"container exited with code {exit_code}; restarting")
            delay = self.restart_backoff

    def _launch(self, pod: FakePod) -> tuple[subprocess.Popen | None, list[threading.Thread]]:
        pod.up_since = pod.started_at = _now()
        if not pod.args.strip():
            self._log(pod, "system", "container started with the image's default command (the fake runs nothing)")
            return None, []
        pod.process = subprocess.Popen(
            ["bash", "-c", pod.args],
            cwd=pod.workdir,
            env=self._container_env(pod),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._log(pod, "system", f"container started: {pod.args}")
        readers = [
            threading.Thread(target=self._pump_output, args=(pod, stream), daemon=True)
            for stream in (pod.process.stdout, pod.process.stderr)
        ]
        for reader in readers:
            reader.start()
        return pod.process, readers

    def _container_env(self, pod: FakePod) -> dict[str, str]:
        gpu_count = pod.gpu["count"] if pod.gpu else 0
        injected = {
            "RUNPOD_POD_ID": pod.id,
            "RUNPOD_DC_ID": pod.data_center_id,
            "RUNPOD_POD_HOSTNAME": f"{pod.id}-fake",
            "RUNPOD_GPU_COUNT": str(gpu_count),
            "RUNPOD_CPU_COUNT": str(pod.cpu["vcpuCount"] if pod.cpu else VCPUS_PER_GPU * gpu_count),
            "RUNPOD_API_KEY": pod.api_key,
            "RUNPOD_PUBLIC_IP": "127.0.0.1",
        }
        injected |= {f"RUNPOD_TCP_PORT_{_private_port(spec)}": str(public) for spec, public in pod.port_map.items()}
        env = {**self.image_env, "HOME": str(pod.workdir), **pod.env}
        if pod.mounts.get("network"):
            mount = pod.mounts["network"][0]
            injected["RUNPOD_VOLUME_ID"] = mount["volumeId"]
            volume = self.volumes.get(mount["volumeId"])
            path = mount["path"].rstrip("/")
            if volume is not None:  # the mount path does not exist here: its values point into the volume's folder
                env = {
                    k: str(volume.folder) + v[len(path) :] if v == path or v.startswith(path + "/") else v
                    for k, v in env.items()
                }
        return {**env, **injected}

    def _pump_output(self, pod: FakePod, stream: Any) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                with self._lock:
                    self._log(pod, "container", raw.decode(errors="replace").rstrip("\r\n"))

    def _log(self, pod: FakePod, source: Literal["container", "system"], line: str) -> None:
        pod.logs.append(LogLine(pod.next_log_seq, _now(), source, line))
        pod.next_log_seq += 1
        del pod.logs[:-LOG_LINES_KEPT]

    # Logs

    def _open_log_stream(
        self, pod_id: str, source: str | None, tail: int, since: datetime | None, last_event_id: str | None
    ) -> StreamingResponse:
        with self._lock:
            pod = self._visible_pod(pod_id)
            lines = [line for line in pod.logs if source in (None, line.source)]
            backlog = _backlog(lines, tail, since, last_event_id)
            cursor = pod.next_log_seq - 1
        headers = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
        stream = self._stream_logs(pod, source, backlog, cursor)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def _stream_logs(self, pod: FakePod, source: str | None, backlog: list[LogLine], cursor: int):
        """Send the backlog, then follow new lines for `log_follow_seconds` (RunPod's stream stays open)."""
        for line in backlog:
            yield line.sse_event()
        deadline = time.monotonic() + self.log_follow_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            with self._lock:
                fresh = [line for line in pod.logs if line.seq > cursor and source in (None, line.source)]
                cursor = pod.next_log_seq - 1
                ended = pod.status == "TERMINATED"
            for line in fresh:
                yield line.sse_event()
            if ended:
                return

    # Catalog

    def _list_gpu_types(self, filters: AvailabilityFilters | None) -> dict[str, Any]:
        with self._lock:
            return {"gpus": [self._gpu_type_json(gpu_id, filters) for gpu_id in GPU_TYPES]}

    def _get_gpu_type(self, gpu_id: str, filters: AvailabilityFilters | None) -> dict[str, Any]:
        if gpu_id not in GPU_TYPES:
            raise Problem(404, f"GPU type {gpu_id!r} not found")
        with self._lock:
            return self._gpu_type_json(gpu_id, filters)

    def _gpu_type_json(self, gpu_id: str, filters: AvailabilityFilters | None) -> dict[str, Any]:
        name, memory, pool = GPU_TYPES[gpu_id]
        prices = {
            cloud: [entry.price_per_hour for key, entry in self.stock.items() if key[:2] == (gpu_id, cloud)]
            for cloud in CLOUDS
        }
        body = {
            "id": gpu_id,
            "name": name,
            "pool": pool,
            "manufacturer": "AMD" if gpu_id.startswith("AMD") else "NVIDIA",
            "memory": memory,
            "secure": bool(prices["SECURE"]),
            "community": bool(prices["COMMUNITY"]),
            "price": {cloud.lower(): min(prices[cloud], default=_list_price(gpu_id, cloud)) for cloud in CLOUDS},
            "maxCount": MAX_GPUS_PER_POD,
        }
        return body | (self._availability_json(gpu_id, filters) if filters else {})

    def _availability_json(self, gpu_id: str, filters: AvailabilityFilters) -> dict[str, Any]:
        cuda_ok = _cuda_accepted(filters.cuda_versions, filters.min_cuda_version)
        in_stock = cuda_ok and "POD" in filters.products  # the fake's stock is pod stock only
        levels = {
            key[2]: _availability_level(entry.count if in_stock else 0, filters.count)
            for key, entry in self.stock.items()
            if key[:2] == (gpu_id, filters.cloud)
        }
        offered = {data_center: level for data_center, level in levels.items() if level != "NONE"}
        body: dict[str, Any] = {"availability": max(offered.values(), key=AVAILABILITY_LEVELS.index, default="NONE")}
        if offered:
            body["dataCenters"] = [
                {"id": data_center, "name": DATA_CENTER_NAMES.get(data_center, data_center), "availability": level}
                for data_center, level in offered.items()
            ]
        if levels and cuda_ok:
            body["cudaVersions"] = [{"version": HOST_CUDA_VERSION, "available": bool(offered)}]
        return body

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

    # HTTP

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="FakeRunPod", openapi_url=None, docs_url=None, redoc_url=None)
        app.add_exception_handler(Problem, _problem_handler)
        app.add_exception_handler(RequestValidationError, _request_validation_handler)

        @app.post("/v2/pods", status_code=201)
        def create_pod(body: JsonBody):
            return self._create_pod(body)

        @app.get("/v2/pods")
        def list_pods(cursor: str | None = None, includeClusterPods: bool = False):  # noqa: N803 (spec's name)
            return self._list_pods(cursor)

        @app.get("/v2/pods/{pod_id}")
        def get_pod(pod_id: str):
            return self._get_pod(pod_id)

        @app.patch("/v2/pods/{pod_id}")
        def update_pod(pod_id: str, body: JsonBody):
            return self._update_pod(pod_id, body)

        @app.delete("/v2/pods/{pod_id}", status_code=204)
        def delete_pod(pod_id: str):
            self._delete_pod(pod_id)
            return Response(status_code=204)

        @app.post("/v2/pods/{pod_id}/action")
        def pod_action(pod_id: str, body: JsonBody):
            pod = self._pod_action(pod_id, body)
            return Response(status_code=204) if pod is None else pod

        @app.get("/v2/pods/{pod_id}/logs")
        def pod_logs(
            pod_id: str,
            source: Literal["container", "system"] | None = None,
            tail: Annotated[int, Query(ge=0, le=5000)] = 100,
            since: datetime | None = None,
            last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        ):
            return self._open_log_stream(pod_id, source, tail, _as_utc(since), last_event_id)

        @app.get("/v2/network-volumes")
        def list_network_volumes():
            with self._lock:
                return {"networkVolumes": [volume.json() for volume in self.volumes.values()]}

        @app.get("/v2/network-volumes/{volume_id}")
        def get_network_volume(volume_id: str):
            with self._lock:
                if volume_id not in self.volumes:
                    raise Problem(404, f"network volume {volume_id} not found")
                return self.volumes[volume_id].json()

        @app.get("/v2/catalog/gpus")
        def list_gpu_types(filters: CatalogFilters):
            return self._list_gpu_types(filters)

        @app.get("/v2/catalog/gpus/{gpu_id}")
        def get_gpu_type(gpu_id: str, filters: CatalogFilters):
            return self._get_gpu_type(gpu_id, filters)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
        def not_in_fake(path: str, request: Request):
            raise _unrouted_problem(request.method, f"/{path}")

        return app


class _Gateway:
    """The outermost ASGI layer: records each request, applies injected faults, checks the bearer token."""

    def __init__(self, app: FastAPI, fake: FakeRunPod) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        fault = self.fake._record_request(scope["method"], scope["path"], body)
        replay = _replaying(body, receive)
        if fault and not fault.lose_response:
            await fault.problem().response()(scope, replay, send)
            return
        auth_problem = self._auth_problem(scope)
        handler = auth_problem.response() if auth_problem else self.app
        if fault is None:
            await handler(scope, replay, send)
            return
        await handler(scope, replay, _discard)
        await _drop_connection(send)

    def _auth_problem(self, scope: dict) -> Problem | None:
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not authorization.startswith(b"Bearer "):
            return Problem(401, "missing bearer token", headers=challenge)
        if not secrets.compare_digest(authorization.removeprefix(b"Bearer "), self.fake.api_key.encode()):
            return Problem(401, "invalid bearer token", headers=challenge)
        return None


def _check_create_rules(body: dict[str, Any]) -> None:
    """The cross-field rules the spec leaves to RunPod's handler, answered 400 rather than 422."""
    if ("gpu" in body) == ("cpu" in body):
        raise Problem(400, "exactly one of gpu or cpu must be set")
    mounts = body.get("mounts", {})
    if "persistent" in mounts and "network" in mounts:
        raise Problem(400, "mounts.persistent and mounts.network are mutually exclusive")
    if "persistent" in mounts and "cpu" in body:
        raise Problem(400, "mounts.persistent is not allowed on CPU pods; use a network volume")
    gpu = body.get("gpu", {})
    if gpu.get("allowedCudaVersions") and "minCudaVersion" in gpu:
        raise Problem(400, "gpu.allowedCudaVersions and gpu.minCudaVersion are mutually exclusive")
    _check_ports(body.get("ports", []))


def _check_ports(ports: list[str]) -> None:
    for port in ports:
        if not PORT_PATTERN.fullmatch(port):
            raise Problem(400, f"invalid port {port!r}: expected <port>/http or <port>/tcp, e.g. 8000/http")


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


def _map_ports(ports: list[str], current: dict[str, int]) -> dict[str, int]:
    """Give each exposed port a free loopback port, keeping the ones already mapped."""
    return {spec: current.get(spec) or free_port() for spec in ports}


def _private_port(port_spec: str) -> int:
    return int(port_spec.split("/")[0])


def _list_price(gpu_id: str, cloud: str) -> float:
    """A plausible price for a GPU nobody priced: about 2.5 cents per GB of memory, 30% less on community."""
    secure = 0.025 * GPU_TYPES[gpu_id][1]
    return round(secure if cloud == "SECURE" else 0.7 * secure, 2)


def _availability_level(free_gpus: int, gpus_per_pod: int) -> str:
    pods_that_fit = free_gpus // gpus_per_pod
    if pods_that_fit == 0:
        return "NONE"
    return "LOW" if pods_that_fit <= 2 else "MEDIUM" if pods_that_fit <= 5 else "HIGH"


def _cuda_accepted(allowed: list[str] | None, minimum: str | None) -> bool:
    """Whether a fake host (CUDA 12.8) satisfies a CUDA constraint."""
    if allowed:
        return HOST_CUDA_VERSION in allowed
    return minimum is None or _version(minimum) <= _version(HOST_CUDA_VERSION)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _backlog(lines: list[LogLine], tail: int, since: datetime | None, last_event_id: str | None) -> list[LogLine]:
    """The lines a log stream starts with; `Last-Event-ID` wins over `since`, which wins over `tail`."""
    if last_event_id:
        timestamp, _, seq = last_event_id.partition("/")
        if seq.isdigit():
            return [line for line in lines if line.seq > int(seq)]
        resume_after = _as_utc(datetime.fromisoformat(timestamp))
        return [line for line in lines if line.ts > resume_after]
    if since:
        return [line for line in lines if line.ts >= since]
    return lines[-tail:] if tail else []


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo:
        return moment
    return moment.replace(tzinfo=UTC)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _alive(process: subprocess.Popen | None) -> bool:
    return process is not None and process.poll() is None


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _terminate_process_groups(processes: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each process group, then SIGKILL each group once its leader exits or `grace` seconds pass."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _unrouted_problem(method: str, path: str) -> Problem:
    """404 for paths RunPod does not have, 405 for methods it does not take, 501 for what the fake leaves out."""
    methods = {
        spec_method.upper()
        for spec_path, operations in spec_schemas().spec["paths"].items()
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", spec_path), path)
        for spec_method in operations
        if spec_method != "parameters"
    }
    if not methods:
        return Problem(404, f"no route {path} in RunPod's API v2")
    if method not in methods:
        return Problem(405, f"{method} is not allowed on {path}", headers={"Allow": ", ".join(sorted(methods))})
    return Problem(501, f"{method} {path} is part of RunPod's API but not implemented by FakeRunPod")


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


async def _problem_handler(request: Request, problem: Problem) -> JSONResponse:
    return problem.response()


async def _request_validation_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = [f"{'.'.join(str(part) for part in issue['loc'])}: {issue['msg']}" for issue in error.errors()]
    return Problem(422, "Request validation failed: " + "; ".join(errors), errors=errors).response()


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the app the body the gateway already read, then defers to the server's."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _discard(message: dict) -> None:
    """A `send` that drops the response of a request whose response is to be lost."""


async def _drop_connection(send: Any) -> None:
    """Close the client's connection without sending a byte, as when a response is lost on the way.

    ASGI cannot abort a connection, and a response head without its body is a complete 204, so this takes
    the socket from uvicorn's h11 request cycle (the bound method `send` belongs to).
    """
    send.__self__.transport.close()
    await asyncio.sleep(0)  # let uvicorn see the disconnect, so it does not write a 500 to the closed socket


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


if __name__ == "__main__":
    raise SystemExit(main())

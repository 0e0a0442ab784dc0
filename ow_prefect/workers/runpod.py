"""The `runpod` work-pool worker: one RunPod GPU pod per flow run, deleted the moment the run ends.

    prefect work-pool create gpu --type runpod
    prefect worker start --pool gpu

For each flow run the worker ranks the GPU types that fit (`min_vram_gb` plus `vram_margin` over `gpu_count`
GPUs, in the allowed clouds and data centers, under `max_price_per_hour`, preference list first, then cheapest),
creates a
pod on the first one that has capacity, reports `runpod::<pod id>` as the run's infrastructure, and then
watches the run and the pod together until one of them ends:

- run terminal, cancelling, rescheduled (a preempted pod's SIGTERM) or suspended → the pod is deleted;
- pod in ERROR, its container exiting before the run finished, or the run not started within
  `startup_timeout` → the run is Crashed with the pod's last log lines, and the pod deleted;
- `max_runtime` passed → the run is Failed (TimedOut) and the pod deleted;
- `max_cost` reached (price × time) → the run is Failed (CostCapped) and the pod deleted. Before either, a fine-tune
  is asked to save a checkpoint (ow_prefect/costs/stop.py), so that a rerun resumes.

Before any pod, the worker estimates the run (ow_prefect/costs: the GPU it would take, runtime from the job's tokens,
cost range) into a `runpod-estimate-<flow run id>` artifact, refuses a run whose expected cost is above `max_cost`,
and refuses every run of a pool whose `daily_budget` is spent. A network volume holds the Hugging Face cache
(`HF_HOME`); `cache_volume_ids` makes the worker prefer the data centers that hold one (ow_prefect/runpod/volumes.py).

A reconciler (at start, then every `OW_RUNPOD_RECONCILE_SECONDS`) deletes pods of this work pool that no
worker watches and whose run is over, gone, rescheduled or past its `max_runtime` or `max_cost`: a worker that died
mid-run leaves nothing billing for long. Every pod emits `ow.pod.created`, `ow.pod.running` and
`ow.pod.terminated` events related to its flow run, and its run gets a `runpod-cost-<flow run id>` table
artifact (price × time from create to delete, one row per pod over every attempt).

The pod's environment holds only what the run needs: the Prefect API URL and its key or auth string, the flow
run id, `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`, `OW_STORAGE_BLOCK` / `OW_HF_*` when set, the
job's own `env`, and two non-secret markers (work pool id, deadline). It is never logged; pods are named
`ow-<flow run id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlparse
from uuid import UUID

import anyio
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import emit_event
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, get_current_settings, temporary_settings
from prefect.states import Cancelled, Crashed, Failed
from prefect.utilities.engine import propose_state
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field, ValidationError, field_validator, model_validator

from ow_prefect.costs.budget import pool_resource
from ow_prefect.costs.guard import RunCosts
from ow_prefect.costs.stop import clear_stop, request_stop
from ow_prefect.errors import ConfigurationError, ParameterError
from ow_prefect.jobs.base import validation_problems
from ow_prefect.jobs.registry import get_job_type
from ow_prefect.runpod.client import AsyncRunPodClient
from ow_prefect.runpod.credentials import RunPodCredentials
from ow_prefect.runpod.errors import RunPodAuthError, RunPodError, RunPodNoCapacity, RunPodNotFound
from ow_prefect.runpod.models import Pod
from ow_prefect.runpod.offers import (
    CLOUDS,
    DEFAULT_VRAM_MARGIN,
    Candidate,
    Ranking,
    find_offers,
    with_margin,
)
from ow_prefect.runpod.volumes import create_on_choices, hf_home, volume_choices
from ow_prefect.settings import get_settings

POD_PREFIX = "ow-"
POOL_MARKER = "OW_WORK_POOL_ID"  # env markers: how the reconciler knows a pod is this pool's (v2 has no labels)
DEADLINE_MARKER = "OW_POD_DEADLINE"  # epoch seconds after which the pod is past its max_runtime
INFRA_PREFIX = "runpod::"
# Prefect settings a pod needs to reach the API; every other setting of the worker stays on the worker.
POD_PREFECT_SETTINGS = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_TLS_INSECURE_SKIP_VERIFY",
    "PREFECT_CLOUD_API_URL",
)
POD_OW_SETTINGS = (
    "OW_STORAGE_BLOCK",
    "OW_HF_TOKEN_SECRET",
    "OW_HF_ORG",
    "OW_STORAGE_RETRY_SECONDS",
    "OW_POD_CODE_DIR",  # where the pod finds the code (ow_prefect.workers.pull)
)
MAX_COST_MARKER = "OW_POD_MAX_COST"  # USD: the reconciler stops a pod whose price × age reaches it
CHECKPOINT_GRACE_SECONDS = 180.0  # how long a fine-tune asked to stop may take to store its checkpoint
ESTIMATE_TIMEOUT_SECONDS = 60.0  # the estimate reads the data files' sizes and the model's config: never wait longer
PORT_SPEC = re.compile(r"^\d{1,5}/(http|tcp)$")
DEFAULT_QUERY_SECONDS = 2.0  # GPU runs deserve a faster pick-up than Prefect's 10 s; PREFECT_WORKER_QUERY_SECONDS wins
CAPACITY_RETRY_SECONDS = (5.0, 60.0)  # first and longest pause between rounds while waiting for capacity
CANCEL_GRACE_SECONDS = 5.0  # lets the supervisor in the pod finish a cancellation it already saw
PREEMPT_GRACE_SECONDS = 60.0  # lets a pod that RunPod stopped reschedule its run through its SIGTERM handler
STALE_CANCELLING_SECONDS = 60.0
LOG_LINES_IN_MESSAGE = 15
LOG_LINES_LOGGED = 40
LOG_LINES_SEARCHED = 400  # for the first exception: a crash loop repeats it, Prefect's reactions follow it
ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Exit)\b.*: ")  # a Python exception's last line


class RunPodVariables(BaseVariables):
    """What a work pool, deployment or flow run may set (`job_variables`); shown as the pool's form."""

    image: str = Field(
        default_factory=lambda: get_settings().train_image,
        title="Image",
        description="Container image of the pod; it must have Prefect and the flow's code. ow_prefect jobs set it.",
    )
    gpu_types: list[str] = Field(
        default_factory=list,
        title="GPU types",
        description="RunPod GPU type ids to use, most preferred first (e.g. 'NVIDIA RTX A6000'). Empty: the "
        "cheapest type in stock with enough memory.",
    )
    min_vram_gb: float = Field(
        default=16,
        ge=0,
        title="Minimum GPU memory (GB)",
        description="Total GPU memory the job needs, over all its GPUs. ow_prefect jobs pass their estimate.",
    )
    vram_margin: float = Field(
        default=DEFAULT_VRAM_MARGIN,
        ge=0,
        le=1,
        title="GPU memory margin",
        description="Share of memory asked for on top of min_vram_gb (0.15: a 40 GB job needs a 46 GB card), "
        "because the estimates can fall short; 0 packs a job to its estimate.",
    )
    gpu_count: int = Field(default=1, ge=1, le=8, title="GPU count", description="GPUs per pod.")
    cloud: Literal["SECURE", "COMMUNITY", "ANY"] = Field(
        default="SECURE",
        title="Cloud",
        description="SECURE (RunPod's data centers), COMMUNITY (cheaper hosts run by third parties; the pod "
        "receives your Prefect API credentials) or ANY.",
    )
    data_center_ids: list[str] = Field(
        default_factory=list,
        title="Data centers",
        description="Allowed data centers (e.g. 'US-TX-3'); empty: any. A network volume pins its own.",
    )
    max_price_per_hour: float | None = Field(
        default=None, gt=0, title="Max price per hour (USD)", description="Never rent a pod above this price."
    )
    min_cuda_version: str | None = Field(
        default=None,
        pattern=r"^\d+\.\d+$",
        title="Minimum CUDA version",
        description="Lowest host CUDA version the image needs, e.g. '13.0' for the ow_prefect images (CUDA 13 "
        "wheels: host driver >= 580). Empty: any host.",
    )
    data_center_min_cuda_version: str | None = Field(
        default=None,
        pattern=r"^\d+\.\d+$",
        title="Minimum CUDA version on data-center GPUs",
        description="A lower floor for NVIDIA data-center GPUs (A100, H100, L40S, ...) when the image ships NVIDIA's "
        "cuda-compat package (forward compatibility, which GeForce and RTX workstation cards lack): '12.2' (driver "
        ">= 535) for the ow_prefect images. Empty: min_cuda_version for every GPU.",
    )
    container_disk_gb: int = Field(
        default=50, ge=1, title="Container disk (GB)", description="Ephemeral disk, wiped when the pod ends."
    )
    volume_gb: int | None = Field(
        default=None,
        ge=10,
        title="Volume (GB)",
        description="Host-local volume mounted at `volume_mount_path` (at least 10 GB).",
    )
    network_volume_id: str | None = Field(
        default=None,
        title="Network volume",
        description="Id of a RunPod network volume to mount at `volume_mount_path` (instead of a volume); the pod "
        "runs in its data center, and the Hugging Face cache (HF_HOME) lives on it.",
    )
    cache_volume_ids: list[str] = Field(
        default_factory=list,
        title="Model cache volumes",
        description="RunPod network volumes (one per data center) that hold the Hugging Face cache: offers in their "
        "data centers are tried first, with the volume at `volume_mount_path` and HF_HOME on it, so a model an "
        "earlier pod downloaded there is not downloaded again; with no capacity there, the pod runs elsewhere "
        "without a cache.",
    )
    volume_mount_path: str = Field(default="/workspace", title="Volume mount path")
    ports: list[str] = Field(
        default_factory=list,
        title="Ports",
        description="Exposed ports as '<port>/http' (public proxy https://<pod>-<port>.proxy.runpod.net) or "
        "'<port>/tcp'.",
    )
    registry_auth_id: str | None = Field(
        default=None, title="Registry credential", description="RunPod container registry credential id."
    )
    max_runtime: int = Field(
        default=86400,
        ge=1,
        title="Max runtime (seconds)",
        description="Hard cap from pod creation: past it the run fails (TimedOut) and the pod is deleted (a "
        "fine-tune stores a checkpoint first).",
    )
    max_cost: float | None = Field(
        default=None,
        gt=0,
        title="Max cost (USD)",
        description="A run whose estimated cost is above this is refused before any pod exists; a pod whose price "
        "× time reaches it is stopped (the run fails, CostCapped; a fine-tune stores a checkpoint first).",
    )
    daily_budget: float | None = Field(
        default=None,
        gt=0,
        title="Daily budget (USD)",
        description="Set on the pool: once its pods cost this much today (UTC), no new pod is created until "
        "tomorrow. Values on deployments or runs are ignored.",
    )
    startup_timeout: int = Field(
        default=1200,
        ge=1,
        title="Startup timeout (seconds)",
        description="From pod creation until the flow run starts (image pull included); past it: Crashed.",
    )
    capacity_wait: int = Field(
        default=0,
        ge=0,
        title="Wait for capacity (seconds)",
        description="When no candidate has capacity, keep retrying this long instead of failing at once.",
    )
    credentials: RunPodCredentials | None = Field(
        default=None,
        title="RunPod credentials",
        description="A RunPod Credentials block; empty: RUNPOD_API_KEY in the worker's environment.",
    )


class RunPodJobConfiguration(BaseJobConfiguration):
    """The resolved job variables of one flow run, and the pod request they make."""

    image: str = Field(default_factory=lambda: get_settings().train_image)
    gpu_types: list[str] = Field(default_factory=list)
    min_vram_gb: float = Field(default=16, ge=0)
    vram_margin: float = Field(default=DEFAULT_VRAM_MARGIN, ge=0, le=1)
    gpu_count: int = Field(default=1, ge=1, le=8)
    cloud: Literal["SECURE", "COMMUNITY", "ANY"] = "SECURE"
    data_center_ids: list[str] = Field(default_factory=list)
    max_price_per_hour: float | None = Field(default=None, gt=0)
    min_cuda_version: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    data_center_min_cuda_version: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    container_disk_gb: int = Field(default=50, ge=1)
    volume_gb: int | None = Field(default=None, ge=10)
    network_volume_id: str | None = None
    cache_volume_ids: list[str] = Field(default_factory=list)
    volume_mount_path: str = "/workspace"
    ports: list[str] = Field(default_factory=list)
    registry_auth_id: str | None = None
    max_runtime: int = Field(default=86400, ge=1)
    max_cost: float | None = Field(default=None, gt=0)
    startup_timeout: int = Field(default=1200, ge=1)
    capacity_wait: int = Field(default=0, ge=0)
    credentials: RunPodCredentials | None = None

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, ports: list[str]) -> list[str]:
        bad = [port for port in ports if not PORT_SPEC.match(port)]
        if bad:
            raise ValueError(f"ports {bad}: write each as '<port>/http' or '<port>/tcp', e.g. '8000/http'")
        return ports

    @model_validator(mode="after")
    def _one_volume(self) -> RunPodJobConfiguration:
        volumes = [name for name in ("volume_gb", "network_volume_id", "cache_volume_ids") if getattr(self, name)]
        if len(volumes) > 1:
            raise ValueError(f"set one of {' and '.join(volumes)}, not both (RunPod mounts one volume per pod)")
        return self

    @property
    def clouds(self) -> tuple[str, ...]:
        return CLOUDS if self.cloud == "ANY" else (self.cloud,)

    async def find_offers(
        self, runpod: AsyncRunPodClient, *, fresh: bool = False, data_centers: Sequence[str] | None = None
    ) -> Ranking:
        """The offers this run may take, in the order the worker tries them (`data_centers`: only those), and why
        the others were left out. The worker's create and the cost estimate (ow_prefect/costs) both use it."""
        return await find_offers(
            runpod,
            min_vram_gb=with_margin(self.min_vram_gb, self.vram_margin),
            gpu_count=self.gpu_count,
            preferred=self.gpu_types,
            clouds=self.clouds,
            max_price_per_hour=self.max_price_per_hour,
            data_centers=self.data_center_ids if data_centers is None else data_centers,
            min_cuda_version=self.min_cuda_version,
            data_center_min_cuda_version=self.data_center_min_cuda_version,
            fresh=fresh,
        )

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: Any = None,
        flow: Any = None,
        work_pool: Any = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        """Like every worker, then cut the env down to what the pod needs (Prefect would copy every setting of
        the worker, `PREFECT_HOME` and database URLs included)."""
        job_env = {key: value for key, value in self.env.items() if value is not None}
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id)
        settings = self._base_environment()
        ow = get_settings()
        ow_env = {"OW_STORAGE_BLOCK": ow.storage_block} | ow.exported(POD_OW_SETTINGS[1:])
        env = {
            **{name: settings[name] for name in POD_PREFECT_SETTINGS if settings.get(name)},
            **self._base_flow_run_environment(flow_run),
            "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule",
            **{name: value for name, value in ow_env.items() if value},
            **job_env,
        }
        if work_pool is not None:
            env[POOL_MARKER] = str(work_pool.id)
        self.env = env

    def pod_request(self, name: str, deadline: float) -> dict[str, Any]:
        """The create body, without the GPU and cloud (filled per candidate)."""
        env = {**self.env, DEADLINE_MARKER: str(int(deadline))}
        if self.max_cost:
            env[MAX_COST_MARKER] = str(self.max_cost)
        if self.network_volume_id:  # the model cache on the volume; a job's own HF_HOME wins
            env.setdefault("HF_HOME", hf_home(self.volume_mount_path))
        body: dict[str, Any] = {
            "name": name,
            "image": self.image,
            "args": self.command or "prefect flow-run execute",
            "env": env,
            "disk": self.container_disk_gb,
            "ports": list(self.ports),
        }
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        if self.volume_gb:
            body["mounts"] = {"persistent": {"size": self.volume_gb, "path": self.volume_mount_path}}
        elif self.network_volume_id:
            body["mounts"] = {"network": [{"volumeId": self.network_volume_id, "path": self.volume_mount_path}]}
        if self.registry_auth_id:
            body["registry"] = self.registry_auth_id
        return body

    def runpod_credentials(self) -> RunPodCredentials:
        return self.credentials or RunPodCredentials.from_env()


def runpod_job_variables(**variables: Any) -> dict[str, Any]:
    """Job variables for a flow on a `runpod` pool, checked before anything is deployed::

        my_flow.from_source(source, "flow.py:my_flow").deploy(
            "nightly", work_pool_name="gpu", job_variables=runpod_job_variables(min_vram_gb=40, image="...")
        )

    Prefect accepts a misspelled variable (`min_vram=40`) silently and ignores it, and explains a wrong type
    only with an HTTP error; this names every problem. Credentials stay on the pool (`ow setup`), never in a
    deployment.
    """
    pool_only = {"daily_budget": "the pool's budget: set it on the pool, a deployment's value is ignored"}
    allowed = set(RunPodVariables.model_fields) - {"credentials", *pool_only}
    problems = [
        f"{name}: {pool_only.get(name, 'not a runpod job variable')}" for name in sorted(set(variables) - allowed)
    ]
    if not problems:
        try:
            checked = RunPodJobConfiguration.model_validate(variables)
        except ValidationError as exc:
            problems = validation_problems(exc)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ParameterError(f"invalid runpod job variables:\n{listed}\nknown variables: {', '.join(sorted(allowed))}")
    return checked.model_dump(mode="json", include=set(variables))


class RunPodWorkerResult(BaseWorkerResult):
    """`identifier` is the pod id; `status_code` 0 unless the worker crashed or timed the run out."""


@dataclass
class PodRecord:
    """One pod of one attempt of a flow run: what its cost and events are computed from."""

    pod: Pod
    flow_run_id: UUID
    flow_run_name: str
    price_per_hour: float
    created_at: float = field(default_factory=time.time)
    gpu: str = ""
    cloud: str = ""

    @classmethod
    def of(cls, pod: Pod, flow_run: FlowRun, candidate: Candidate) -> PodRecord:
        price = pod.cost or candidate.price_per_hour
        return cls(
            pod,
            flow_run.id,
            flow_run.name,
            price,
            gpu=f"{candidate.count}x {candidate.gpu_id}",
            cloud=pod.cloud or candidate.cloud,
        )

    @classmethod
    def found(cls, pod: Pod, flow_run_id: UUID, flow_run_name: str) -> PodRecord:
        """A pod the reconciler found: its creation time and price come from RunPod."""
        created = _parse_time(pod.created_at) or time.time()
        gpu = f"{pod.gpu.count}x {pod.gpu.id}" if pod.gpu else "CPU"
        return cls(pod, flow_run_id, flow_run_name, pod.cost or 0.0, created_at=created, gpu=gpu, cloud=pod.cloud or "")

    @property
    def pod_id(self) -> str:
        return self.pod.id

    def cost_so_far(self) -> float:
        return self.price_per_hour * max(0.0, time.time() - self.created_at) / 3600

    def event_resource(self) -> dict[str, str]:
        return {
            "prefect.resource.id": f"runpod.pod.{self.pod_id}",
            "prefect.resource.name": self.pod.name,
            "ow.pod.gpu": self.gpu,
            "ow.pod.cloud": self.cloud,
        }

    def related(self) -> list[dict[str, str]]:
        return [
            {
                "prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": self.flow_run_name,
            }
        ]

    def payload(self) -> dict[str, Any]:
        return {
            "pod_id": self.pod_id,
            "gpu": self.gpu,
            "cloud": self.cloud,
            "data_center": self.pod.data_center_id,
            "price_per_hour": self.price_per_hour,
        }


@dataclass
class Outcome:
    """How a watch ended: the state to set before and after deleting the pod, and the worker's exit code."""

    reason: str
    before_delete: Any = None  # a state proposed (forced) before the delete: final states block a reschedule
    after_delete: Any = None  # a state forced once the pod is gone (Crashed does not block a reschedule)
    status_code: int = 0


class RunPodWorker(BaseWorker[RunPodJobConfiguration, RunPodVariables, RunPodWorkerResult]):
    """Runs each flow run in its own RunPod GPU pod and deletes the pod when the run ends."""

    type = "runpod"
    job_configuration = RunPodJobConfiguration
    job_configuration_variables = RunPodVariables
    _description = (
        "Run each flow run on its own RunPod GPU pod (REST API v2): the cheapest GPU type that fits and is in "
        "stock, deleted the moment the run ends."
    )
    _display_name = "RunPod"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watched: dict[str, UUID] = {}  # pod id -> flow run id, for the pods this worker watches
        self._credentials: dict[tuple[str, str], RunPodCredentials] = {}
        self._reconciler: asyncio.Task | None = None
        self._warned: set[str] = set()
        self._stopping: set[UUID] = set()  # runs asked to stop at a checkpoint (ow_prefect/costs/stop.py)

    @classmethod
    def base_job_template(cls, credentials_block_id: UUID | str | None = None, **defaults: Any) -> dict[str, Any]:
        """The pool's base job template with other defaults, e.g. ``credentials_block_id=block_id`` (a saved
        RunPod Credentials block) or ``cloud="ANY"``; for `create_work_pool` from Python."""
        template = cls.get_default_base_job_template()
        properties = template["variables"]["properties"]
        unknown = set(defaults) - set(properties)
        if unknown:
            raise ValueError(f"unknown RunPod job variables {sorted(unknown)}; known: {sorted(properties)}")
        for name, value in defaults.items():
            properties[name]["default"] = value
        if credentials_block_id:
            properties["credentials"]["default"] = {"$ref": {"block_document_id": str(credentials_block_id)}}
        return template

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self, *args: Any, **kwargs: Any) -> None:
        if "query_seconds" in get_current_settings().worker.model_fields_set:
            return await super().start(*args, **kwargs)
        with temporary_settings(updates={PREFECT_WORKER_QUERY_SECONDS: DEFAULT_QUERY_SECONDS}):
            return await super().start(*args, **kwargs)

    async def setup(self) -> None:
        await super().setup()
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="runpod-reconciler")

    async def teardown(self, *exc_info: Any) -> None:
        if self._reconciler:
            self._reconciler.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(self._reconciler, return_exceptions=True)
            self._reconciler = None
        await super().teardown(*exc_info)

    # ---- one flow run --------------------------------------------------------------------------------

    async def run(
        self,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        task_status: anyio.abc.TaskStatus | None = None,
    ) -> RunPodWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        try:
            credentials = configuration.runpod_credentials()
        except ConfigurationError as exc:
            return await self._refuse(flow_run, Failed(name="NoCredentials", message=str(exc)), logger, task_status)
        self._remember(credentials)
        self._check_reachable(configuration, credentials, logger)
        deadline = time.time() + configuration.max_runtime
        request = configuration.pod_request(f"{POD_PREFIX}{flow_run.id}", deadline)
        async with credentials.get_client() as runpod:
            costs = RunCosts(self.client, self._work_pool, flow_run, configuration, logger)
            live_pods = functools.partial(self._live_pod_costs, runpod)
            if (refused := await costs.refusal(runpod, ESTIMATE_TIMEOUT_SECONDS, live_pods)) is not None:
                return await self._refuse(flow_run, refused, logger, task_status)
            try:
                created = await self._create(runpod, flow_run, configuration, request, logger)
            except RunPodNoCapacity as exc:  # expected: one line, not a traceback
                return await self._refuse(flow_run, Failed(name="NoCapacity", message=str(exc)), logger, task_status)
            if created is None:  # cancelled while waiting for capacity
                if task_status:
                    task_status.started("")
                return RunPodWorkerResult(identifier="", status_code=0)
            pod, candidate, choice = created
            record = PodRecord.of(pod, flow_run, candidate)
            self._watched[pod.id] = flow_run.id
            if task_status:
                task_status.started(f"{INFRA_PREFIX}{pod.id}")
            logger.info(f"Pod {pod.id} created: {candidate}, data center {pod.data_center_id or 'any'}")
            self._emit("ow.pod.created", record, attempt=flow_run.run_count + 1)
            await costs.publish(candidate, choice.cached)
            try:
                outcome = await self._watch(runpod, flow_run, configuration, record, deadline, logger)
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    logger.warning(f"Worker stopping: pod {pod.id} keeps running; a restarted worker reconciles it")
                    self._watched.pop(pod.id, None)
                    raise
                logger.exception(f"Watching pod {pod.id} failed; deleting it")
                reason = f"the worker failed while watching it: {type(exc).__name__}: {exc}"
                outcome = Outcome(reason, after_delete=Crashed(message=f"Pod {pod.id}: {reason}"), status_code=1)
            await self._end(runpod, record, outcome, logger)
            return RunPodWorkerResult(identifier=pod.id, status_code=outcome.status_code)

    async def _refuse(
        self, flow_run: FlowRun, state: Any, logger: Any, task_status: anyio.abc.TaskStatus | None
    ) -> RunPodWorkerResult:
        """End a run that gets no pod (no capacity, no credentials, over its max_cost or the pool's daily budget):
        its state says why, the log one line."""
        logger.error(f"{state.name}: {state.message}")
        await propose_state(self.client, state, flow_run_id=flow_run.id)
        if task_status:
            task_status.started("")
        return RunPodWorkerResult(identifier="", status_code=0)

    async def _create(
        self,
        runpod: AsyncRunPodClient,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        request: dict[str, Any],
        logger: Any,
    ) -> tuple[Pod, Candidate, Any] | None:
        """Walk the candidates, cheapest first (in the data centers of the run's volumes first), until one has
        capacity; wait for capacity if configured."""
        give_up = time.monotonic() + configuration.capacity_wait
        fresh = False
        pause = CAPACITY_RETRY_SECONDS[0]
        while True:
            ranking = await configuration.find_offers(runpod, fresh=fresh)

            async def in_data_centers(data_centers: Sequence[str], fresh: bool = fresh) -> list[Candidate]:
                return (await configuration.find_offers(runpod, fresh=fresh, data_centers=data_centers)).candidates

            choices = await volume_choices(runpod, configuration, request, ranking.candidates, in_data_centers)
            try:
                return await create_on_choices(runpod, choices, log=logger.info)
            except RunPodNoCapacity as exc:
                tried = exc.tried
            if time.monotonic() >= give_up:
                raise RunPodNoCapacity(_no_capacity_message(configuration, ranking, tried))
            wait = min(pause, give_up - time.monotonic())
            pause = min(pause * 2, CAPACITY_RETRY_SECONDS[1])
            logger.info(f"No candidate has capacity; trying again in {wait:.0f} s (capacity_wait)")
            if await self._cancelled_within(flow_run, wait):
                await self._mark_flow_run_as_cancelled(
                    flow_run, {"message": "Cancelled while waiting for GPU capacity; no pod was created."}
                )
                return None
            fresh = True

    async def _cancelled_within(self, flow_run: FlowRun, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await anyio.sleep(min(self._poll, max(0.0, end - time.monotonic())))
            state = await self._state(flow_run.id)
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                return True
        return False

    async def _watch(
        self,
        runpod: AsyncRunPodClient,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        record: PodRecord,
        deadline: float,
        logger: Any,
    ) -> Outcome:
        pod = record.pod
        created = time.monotonic()
        flow_started = False
        container: ContainerTracker = ContainerTracker()
        next_pod_check = 0.0
        while True:
            state = await self._state(flow_run.id, logger)
            if state is _GONE:
                return Outcome("its flow run was deleted")
            if state is not None:
                if state.is_crashed():  # e.g. the pull step failed in the pod: Prefect says only "exited with 1"
                    return await self._crash(runpod, flow_run, pod, state.message or "the flow run crashed", logger)
                if state.is_final():
                    return Outcome(f"the flow run is {state.name}")
                if state.is_cancelling():
                    return await self._cancel(flow_run, flow_started, logger)
                if state.is_scheduled():
                    return Outcome("the flow run was rescheduled")
                if state.is_paused() and state.name == "Suspended":
                    return Outcome("the flow run was suspended")
                flow_started = flow_started or state.type not in (StateType.PENDING, StateType.SCHEDULED)
            if time.time() >= deadline:
                message = f"The run exceeded max_runtime ({configuration.max_runtime} s); pod {pod.id} deleted."
                timed_out = Failed(name="TimedOut", message=message)
                return await self._stop(flow_run, "max_runtime passed", timed_out, flow_started, logger)
            if configuration.max_cost and record.cost_so_far() >= configuration.max_cost:
                message = (
                    f"The run reached max_cost (${configuration.max_cost:g}): ${record.cost_so_far():.4f} at "
                    f"${record.price_per_hour:.2f}/h since pod {pod.id} was created; pod deleted."
                )
                capped = Failed(name="CostCapped", message=message)
                return await self._stop(flow_run, "max_cost reached", capped, flow_started, logger)
            if not flow_started and time.monotonic() - created >= configuration.startup_timeout:
                reason = f"the flow run did not start within startup_timeout ({configuration.startup_timeout} s)"
                return await self._crash(runpod, flow_run, pod, reason, logger)
            if time.monotonic() >= next_pod_check:
                next_pod_check = time.monotonic() + self._poll
                try:
                    pod = await runpod.get_pod(pod.id)
                except RunPodNotFound:
                    return await self._pod_gone(runpod, flow_run, pod, "the pod was deleted outside the worker", logger)
                except RunPodError as exc:
                    self._warn_once(logger, f"get-{pod.id}", f"Cannot read pod {pod.id} now ({exc}); still watching")
                else:
                    record.pod = pod
                    if pod.status == "ERROR":
                        return await self._crash(runpod, flow_run, pod, "the pod is in ERROR", logger)
                    if pod.status in ("EXITED", "TERMINATED"):
                        return await self._pod_gone(
                            runpod, flow_run, pod, f"RunPod stopped the pod ({pod.status})", logger
                        )
                    if container.observe(pod) == "up":
                        boot = time.monotonic() - created
                        logger.info(f"Pod {pod.id} is running (container up after {boot:.0f} s)")
                        self._emit("ow.pod.running", record, boot_seconds=round(boot, 1))
                    if container.exits:
                        state = await self._state(flow_run.id, logger)
                        if (
                            state is not None
                            and state is not _GONE
                            and not state.is_final()
                            and not state.is_scheduled()
                        ):
                            reason = "the container exited before the flow run finished"
                            return await self._crash(runpod, flow_run, pod, reason, logger)
                        continue  # the run just finished or moved on: the top of the loop handles it
            await anyio.sleep(self._poll)

    async def _cancel(self, flow_run: FlowRun, flow_started: bool, logger: Any) -> Outcome:
        """A cancelling run: let a running flow's supervisor finish the cancellation for a moment, then mark it
        Cancelled before the delete (a SIGTERM must not turn a cancellation into a reschedule)."""
        if flow_started:
            end = time.monotonic() + CANCEL_GRACE_SECONDS
            while time.monotonic() < end:
                state = await self._state(flow_run.id, logger)
                if state is None or state is _GONE or state.is_final():
                    return Outcome("the flow run was cancelled")
                await anyio.sleep(0.25)
        logger.info("Flow run cancelling: deleting its pod")
        return Outcome(
            "the flow run was cancelled",
            before_delete=Cancelled(message="Cancelled; the RunPod worker deleted the pod."),
        )

    async def _stop(self, flow_run: FlowRun, reason: str, state: Any, flow_started: bool, logger: Any) -> Outcome:
        """Stop a run that passed max_runtime or max_cost: a running fine-tune is first asked to store a checkpoint
        (for up to CHECKPOINT_GRACE_SECONDS), so that a rerun resumes; then `state` and the pod is deleted."""
        if flow_started and await self._stops_at_checkpoint(flow_run.id):
            logger.info(f"{reason}: asking the run to store a checkpoint before its pod is deleted")
            self._stopping.add(flow_run.id)
            await request_stop(flow_run.id, state.message)
            end = time.monotonic() + CHECKPOINT_GRACE_SECONDS
            while time.monotonic() < end:
                current = await self._state(flow_run.id, logger)
                if current is _GONE or (current is not None and current.is_final()):
                    if current is not _GONE and current.message:
                        state = Failed(name=state.name, message=f"{state.message} {current.message}")
                    break
                await anyio.sleep(self._poll)
        return Outcome(reason, before_delete=state, status_code=1)

    async def _live_pod_costs(self, runpod: AsyncRunPodClient) -> list[tuple[float, float]]:
        """(price per hour, creation time) of this pool's pods that run now: the daily budget's running part."""
        return [
            (pod.cost or 0.0, _parse_time(pod.created_at) or time.time())
            for pod in await runpod.find_pods(POD_PREFIX)
            if self._work_pool is not None and pod.env.get(POOL_MARKER) == str(self._work_pool.id) and not pod.ended
        ]

    async def _stops_at_checkpoint(self, flow_run_id: UUID) -> bool:
        """Whether the run's job type saves a checkpoint when asked (its `ow-type:` tag names the type)."""
        try:
            tags = (await self.client.read_flow_run(flow_run_id)).tags
            types = [tag.partition(":")[2] for tag in tags if tag.startswith("ow-type:")]
            return any(get_job_type(name).stops_at_checkpoint for name in types)
        except Exception:  # noqa: BLE001 - an unknown type or an unreachable API: stop it without waiting
            return False

    async def _pod_gone(
        self, runpod: AsyncRunPodClient, flow_run: FlowRun, pod: Pod, reason: str, logger: Any
    ) -> Outcome:
        """The pod ended under the run (preemption, a manual delete): a preempted flow reschedules itself on
        SIGTERM, so give it time to; anything else is a crash."""
        end = time.monotonic() + PREEMPT_GRACE_SECONDS
        while time.monotonic() < end:
            state = await self._state(flow_run.id, logger)
            if state is _GONE:
                return Outcome("its flow run was deleted")
            if state is not None and (state.is_final() or state.is_scheduled() or state.is_cancelling()):
                if state.is_scheduled():
                    logger.info(f"{reason}; the flow run was rescheduled and gets a new pod")
                    return Outcome("the flow run was rescheduled after the pod stopped")
                if state.is_cancelling():
                    return Outcome("the flow run was cancelled", before_delete=Cancelled(message="Cancelled."))
                return Outcome(f"the flow run is {state.name}")
            await anyio.sleep(min(self._poll, 1.0))
        return await self._crash(runpod, flow_run, pod, reason, logger)

    async def _crash(self, runpod: AsyncRunPodClient, flow_run: FlowRun, pod: Pod, reason: str, logger: Any) -> Outcome:
        lines = await _last_log_lines(runpod, pod.id, LOG_LINES_SEARCHED)
        if lines:
            logger.error(f"Last lines of pod {pod.id}'s log:\n" + "\n".join(lines[-LOG_LINES_LOGGED:]))
        tail = "\n".join(lines[-LOG_LINES_IN_MESSAGE:]) or "(the pod wrote no log lines)"
        # the first exception is the cause (a failed pull step, say); later ones are Prefect reacting to it
        errors = [line.strip() for line in lines if ERROR_LINE.match(line)]
        cause = f" The error: {errors[0]}" if errors else ""
        if errors:
            logger.error(f"Pod {pod.id}: the error in its log: {errors[0]}")
        message = f"Pod {pod.id}: {reason.rstrip('.')}.{cause}\nLast lines of its log:\n{tail}"
        logger.error(f"Pod {pod.id}: {reason}; marking the run Crashed and deleting the pod")
        return Outcome(reason, after_delete=Crashed(message=message), status_code=1)

    async def _end(self, runpod: AsyncRunPodClient, record: PodRecord, outcome: Outcome, logger: Any) -> None:
        """Set the outcome's states around deleting the pod; then the terminated event and the cost artifact."""
        flow_run_id = record.flow_run_id
        try:
            if outcome.before_delete is not None:
                await self._force_state(flow_run_id, outcome.before_delete, logger)
            deleted = await self._delete(runpod, record.pod_id, logger, wait=outcome.after_delete is not None)
            if outcome.after_delete is not None:
                await self._force_state(flow_run_id, outcome.after_delete, logger)
        finally:
            self._watched.pop(record.pod_id, None)
            if flow_run_id in self._stopping:
                self._stopping.discard(flow_run_id)
                with contextlib.suppress(Exception):
                    await clear_stop(flow_run_id)
        if deleted != "failed":  # "gone": deleted by kill_infrastructure (a cancellation) or by hand; still ours
            logger.info(f"Pod {record.pod_id} deleted: {outcome.reason}")
            await self._account(record, outcome.reason, logger)

    async def _delete(self, runpod: AsyncRunPodClient, pod_id: str, logger: Any, wait: bool = False) -> str:
        """Delete a pod: "deleted", "gone" (404: someone else did) or "failed" (the reconciler retries later)."""
        try:
            deleted = await runpod.delete_pod(pod_id)
        except RunPodError as exc:
            logger.error(f"Could not delete pod {pod_id} ({exc}); the reconciler will retry")
            return "failed"
        if wait:  # until its processes are gone, so that no SIGTERM handler changes the run's state after us
            with anyio.move_on_after(30):
                while True:
                    try:
                        if (await runpod.get_pod(pod_id)).status == "TERMINATED":
                            break
                    except RunPodNotFound:
                        break
                    except RunPodError:
                        pass
                    await anyio.sleep(1)
        return "deleted" if deleted else "gone"

    async def _account(self, record: PodRecord, reason: str, logger: Any) -> None:
        seconds = max(0.0, time.time() - record.created_at)
        cost = record.price_per_hour * seconds / 3600
        self._emit(
            "ow.pod.terminated", record, billed_seconds=round(seconds, 1), cost_usd=round(cost, 6), reason=reason
        )
        try:
            await _add_cost_row(self.client, record, seconds, cost, reason)
        except Exception:
            logger.warning("Could not write the cost artifact", exc_info=True)

    # ---- kill_infrastructure (cancellation of pending runs, by Prefect) --------------------------------

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: RunPodJobConfiguration, grace_seconds: int = 30
    ) -> None:
        """Delete the run's pod; a pod that is already gone (404) counts as done."""
        if not infrastructure_pid.startswith(INFRA_PREFIX):
            from prefect.exceptions import InfrastructureNotFound

            raise InfrastructureNotFound(f"{infrastructure_pid!r} is not a RunPod pod of this worker")
        async with configuration.runpod_credentials().get_client() as runpod:
            await runpod.delete_pod(infrastructure_pid.removeprefix(INFRA_PREFIX))

    # ---- reconciler ----------------------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except RunPodAuthError as exc:  # said once, without a traceback every pass
                self._warn_once(self._logger, "reconcile-auth", f"RunPod reconciler cannot list pods: {exc}")
            except Exception:
                self._logger.warning("RunPod reconciler pass failed; retrying later", exc_info=True)
            await anyio.sleep(get_settings().runpod_reconcile_seconds)

    async def reconcile(self) -> list[str]:
        """Delete this pool's pods that no worker of this process watches and that should not exist: their
        run is over, deleted, rescheduled, long cancelling or past `max_runtime`. Returns the deleted pod ids."""
        if self._work_pool is None:
            return []
        if not self._credentials:
            try:
                self._remember(await self._pool_credentials())
            except ConfigurationError as exc:  # said once at start: every run of this pool will fail the same way
                self._warn_once(self._logger, "no-credentials", f"Work pool {self._work_pool.name!r}: {exc}")
            except Exception:
                pass
        deleted = []
        for credentials in list(self._credentials.values()):
            async with credentials.get_client() as runpod:
                for pod in await runpod.find_pods(POD_PREFIX):
                    if pod.env.get(POOL_MARKER) != str(self._work_pool.id) or pod.id in self._watched:
                        continue
                    verdict = await self._orphan_verdict(pod)
                    if verdict is None:
                        continue
                    reason, state = verdict
                    flow_run_id = _flow_run_id(pod)
                    self._logger.info(f"Reconciler: deleting pod {pod.id} ({reason})")
                    if state is not None and flow_run_id:
                        await self._force_state(flow_run_id, state, self._logger)
                    if await self._delete(runpod, pod.id, self._logger) == "deleted":  # else another worker did
                        deleted.append(pod.id)
                        if flow_run_id:
                            record = PodRecord.found(pod, flow_run_id, pod.name)
                            await self._account(record, f"reconciler: {reason}", self._logger)
        return deleted

    async def _orphan_verdict(self, pod: Pod) -> tuple[str, Any] | None:
        flow_run_id = _flow_run_id(pod)
        if flow_run_id is None:
            return "it names no flow run", None
        state = await self._state(flow_run_id)
        if state is None:  # the API did not answer: decide next time
            return None
        if state is _GONE:
            return "its flow run no longer exists", None
        if pod.ended:
            return f"it is {pod.status}", None
        if state.is_final():
            return f"its flow run is {state.name}", None
        if state.is_scheduled():
            return "its flow run was rescheduled", None
        deadline = _float(pod.env.get(DEADLINE_MARKER))
        if deadline is not None and time.time() > deadline:
            message = f"The run exceeded its max_runtime; the reconciler deleted pod {pod.id}."
            return "past its max_runtime", Failed(name="TimedOut", message=message)
        max_cost = _float(pod.env.get(MAX_COST_MARKER))
        spent = (pod.cost or 0.0) * max(0.0, time.time() - (_parse_time(pod.created_at) or time.time())) / 3600
        if max_cost is not None and spent >= max_cost:
            message = f"The run reached its max_cost (${max_cost:g}); the reconciler deleted pod {pod.id}."
            return "past its max_cost", Failed(name="CostCapped", message=message)
        if state.is_cancelling() and state.timestamp and _age(state.timestamp) > STALE_CANCELLING_SECONDS:
            return "its flow run has been cancelling for a minute", Cancelled(message="Cancelled; pod deleted.")
        return None

    async def _pool_credentials(self) -> RunPodCredentials:
        """The credentials the work pool's defaults resolve to (block or the worker's RUNPOD_API_KEY)."""
        configuration = await self.job_configuration.from_template_and_values(
            self._work_pool.base_job_template, {}, client=self.client
        )
        return configuration.runpod_credentials()

    # ---- helpers -------------------------------------------------------------------------------------

    @property
    def _poll(self) -> float:
        return get_settings().runpod_poll_seconds

    def _remember(self, credentials: RunPodCredentials) -> None:
        key = (credentials.api_url, credentials.api_key.get_secret_value())
        self._credentials.setdefault(key, credentials)

    async def _state(self, flow_run_id: UUID, logger: Any = None) -> Any:
        """The run's current state; `_GONE` when the run was deleted; None when the API did not answer."""
        try:
            return (await self.client.read_flow_run(flow_run_id)).state
        except ObjectNotFound:
            return _GONE
        except Exception as exc:  # the Prefect API is down or restarting: keep the pod, look again
            self._warn_once(logger or self._logger, f"api-{flow_run_id}", f"Cannot read flow run state now ({exc})")
            return None

    async def _force_state(self, flow_run_id: UUID, state: Any, logger: Any) -> None:
        try:
            await self.client.set_flow_run_state(flow_run_id, state, force=True)
        except ObjectNotFound:
            pass
        except Exception:
            logger.warning(f"Could not set flow run {flow_run_id} to {state.name}", exc_info=True)

    def _emit(self, event: str, record: PodRecord, **payload: Any) -> None:
        pool = [pool_resource(self._work_pool.id)] if self._work_pool is not None else []  # the daily budget's ledger
        emit_event(
            event=event,
            resource=record.event_resource(),
            related=[*record.related(), *pool],
            payload={**record.payload(), **payload},
        )

    def _warn_once(self, logger: Any, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _check_reachable(
        self, configuration: RunPodJobConfiguration, credentials: RunPodCredentials, logger: Any
    ) -> None:
        """Refuse before renting anything when the pod could not reach the Prefect API."""
        api_url = configuration.env.get("PREFECT_API_URL")
        if not api_url:
            raise ValueError(
                "PREFECT_API_URL is not set for the pod: start the worker against a Prefect server the pod can "
                "reach (Prefect Cloud or a public self-hosted URL), or set it in the job variables' env"
            )
        if _is_loopback(api_url) and not _is_loopback(credentials.api_url):
            raise ValueError(
                f"the pod would call the Prefect API at {api_url}, a loopback address it cannot reach: run the "
                "worker with PREFECT_API_URL set to a public URL (plus PREFECT_API_AUTH_STRING or a Cloud key), "
                "or override PREFECT_API_URL in the job variables' env"
            )
        if not configuration.env.get("OW_STORAGE_BLOCK") and not _is_loopback(credentials.api_url):
            self._warn_once(
                logger,
                "storage",
                "OW_STORAGE_BLOCK is not set: ow_prefect jobs in this pod keep their outputs on the pod's own disk, "
                "lost when it is deleted (set it on the worker, e.g. s3-bucket/ow-storage)",
            )


class ContainerTracker:
    """Counts container starts and exits from successive pod reads. A start: `runtime` or `startedAt` appears.
    An exit (RunPod then restarts the container): `runtime` disappears while the pod stays RUNNING, the uptime
    goes back, or `startedAt` changes (a container that lived less than one poll shows only that)."""

    def __init__(self) -> None:
        self.starts = 0
        self.exits = 0
        self._up = False
        self._uptime: int | None = None
        self._started_at: str | None = None

    def observe(self, pod: Pod) -> str | None:
        """ "up" on the first sign of a container, "exited" when one exited since the last read, else None."""
        uptime = pod.runtime.uptime if pod.started and pod.runtime else None
        exited = (
            (self._up and not pod.started)
            or (uptime is not None and self._uptime is not None and uptime < self._uptime)
            or bool(pod.started_at and self._started_at and pod.started_at != self._started_at)
        )
        first = self.starts == 0 and (pod.started or pod.started_at is not None)
        self._up, self._uptime = pod.started, uptime
        self._started_at = pod.started_at or self._started_at
        if first:
            self.starts = 1
        if exited:
            self.exits += 1
            return "exited"
        return "up" if first else None


_GONE = object()


async def _last_log_lines(runpod: AsyncRunPodClient, pod_id: str, count: int, wait: float = 3.0) -> list[str]:
    """The pod's last log lines (container and system), read for at most `wait` seconds."""
    lines: list[str] = []
    with anyio.move_on_after(wait):
        try:
            async for line in runpod.stream_logs(pod_id, source=None, tail=count):
                lines.append(line.line)
        except RunPodError:
            pass
    return lines[-count:]


async def _add_cost_row(client: Any, record: PodRecord, seconds: float, cost: float, reason: str) -> None:
    """Append this pod to the run's cost table (key `runpod-cost-<flow run id>`), keeping earlier attempts."""
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    key = f"runpod-cost-{record.flow_run_id}"
    previous = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
    )
    rows: list[dict[str, Any]] = []
    if previous and isinstance(previous[0].data, str):
        with contextlib.suppress(Exception):
            rows = [row for row in json.loads(previous[0].data) if row.get("pod") != record.pod_id]
    # Column order is what the UI shows first: at 1400 px its table has room for about 850 px, so the cost, the GPU,
    # the time and the price come before the longer text (`ended`) and the ids.
    rows.append(
        {
            "cost_usd": round(cost, 6),
            "gpu": record.gpu,  # RunPod's GPU type id, as gpu_types takes it
            "billed_seconds": round(seconds, 1),
            "usd_per_hour": round(record.price_per_hour, 4),
            "cloud": record.cloud,
            "data_center": record.pod.data_center_id or "",
            "ended": reason,
            "pod": record.pod_id,
            "attempt": len(rows) + 1,
        }
    )
    total = sum(row["cost_usd"] for row in rows)
    description = (
        f"**RunPod cost: ${total:.4f}** over {len(rows)} pod{'s' if len(rows) > 1 else ''} "
        "(price per hour × time from create to delete)."
    )
    await client.create_artifact(
        ArtifactCreate(
            key=key, type="table", data=json.dumps(rows), description=description, flow_run_id=record.flow_run_id
        )
    )


# Why offers were left out, and what to change: (reason, phrase with {n}, the fix).
FILTER_REASONS = {
    "cloud": ("{n} not offered in cloud {cloud}", "cloud: ANY adds the other cloud"),
    "gpu_types": ("{n} not in gpu_types", "add types to gpu_types, or leave it empty"),
    "vram": (
        "{n} with less than {vram:g} GB over {count} GPU(s)",
        "lower min_vram_gb (or requires_vram_gb) or vram_margin, or raise gpu_count",
    ),
    "stock": ("{n} sold out", "capacity_wait retries for a while"),
    "data_centers": ("{n} not in data centers {data_centers}", "widen or empty data_center_ids"),
    "cuda": (
        "{n} without a free host at the CUDA floor ({cuda})",
        "lower min_cuda_version / "
        "data_center_min_cuda_version only for an image built for an older CUDA (docs/runpod.md, CUDA)",
    ),
    "price": ("{n} above ${price:g}/h", "raise max_price_per_hour"),
}


def _filter_summary(configuration: RunPodJobConfiguration, ranking: Ranking) -> tuple[str, str]:
    """(what each filter removed, with counts; what to change), in filter order."""
    cuda = f"host CUDA >= {configuration.min_cuda_version}" if configuration.min_cuda_version else ""
    if configuration.data_center_min_cuda_version:
        cuda = ", ".join(filter(None, [cuda, f">= {configuration.data_center_min_cuda_version} on data-center GPUs"]))
    values = {
        "cloud": configuration.cloud,
        "vram": with_margin(configuration.min_vram_gb, configuration.vram_margin),  # what the filter compares
        "count": configuration.gpu_count,
        "data_centers": configuration.data_center_ids,
        "cuda": cuda or "none",
        "price": configuration.max_price_per_hour or 0,
    }
    removed = [(reason, n) for reason in FILTER_REASONS if (n := ranking.removed.get(reason))]
    what = "; ".join(FILTER_REASONS[reason][0].format(n=n, **values) for reason, n in removed)
    fixes = "; ".join(FILTER_REASONS[reason][1] for reason, _ in removed)
    return what, fixes


def _no_capacity_message(configuration: RunPodJobConfiguration, ranking: Ranking, tried: Sequence[str] = ()) -> str:
    wanted = (
        f"{configuration.gpu_count} GPU(s) with {configuration.min_vram_gb:g} GB in total "
        f"(+{configuration.vram_margin:.0%} margin: "
        f"{with_margin(configuration.min_vram_gb, configuration.vram_margin):g} GB), cloud "
        f"{configuration.cloud}"
        + (f", types {configuration.gpu_types}" if configuration.gpu_types else "")
        + (f", data centers {configuration.data_center_ids}" if configuration.data_center_ids else "")
        + (f", at most ${configuration.max_price_per_hour:g}/h" if configuration.max_price_per_hour else "")
        + (f", host CUDA >= {configuration.min_cuda_version}" if configuration.min_cuda_version else "")
        + (
            f" (>= {configuration.data_center_min_cuda_version} on data-center GPUs)"
            if configuration.data_center_min_cuda_version
            else ""
        )
    )
    what, fixes = _filter_summary(configuration, ranking)
    filtered = f"Of {ranking.considered} offers (GPU type × cloud) in RunPod's catalog: {what}." if what else ""
    if not ranking.candidates:
        change = f" To change: {fixes}." if fixes else ""
        return f"No RunPod GPU fits {wanted}. {filtered}{change}".strip()
    waited = f" (waited {configuration.capacity_wait} s)" if configuration.capacity_wait else ""
    return (
        f"No capacity on any of {len(ranking.candidates)} candidates{waited} for {wanted}. Tried: "
        + "; ".join(tried[-20:])
        + (f". {filtered}" if filtered else "")
        + " Set capacity_wait to keep trying, or widen the filters."
    )


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flow_run_id(pod: Pod) -> UUID | None:
    try:
        return UUID(pod.env.get("PREFECT__FLOW_RUN_ID", ""))
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _age(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (datetime.now(UTC) - moment).total_seconds()


__all__ = ["RunPodJobConfiguration", "RunPodVariables", "RunPodWorker", "RunPodWorkerResult"]

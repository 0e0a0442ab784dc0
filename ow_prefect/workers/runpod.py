"""The `runpod` work-pool worker: one RunPod GPU pod per flow run, deleted the moment the run ends.

    prefect work-pool create gpu --type runpod
    prefect worker start --pool gpu

For each flow run the worker ranks the GPU types that fit (`min_vram_gb` plus `vram_margin` over `gpu_count`
GPUs, in the allowed clouds and data centers, under `max_price_per_hour`, preference list first, then cheapest),
creates a
pod on the first one that has capacity, reports `runpod::<pod id>` as the run's infrastructure, and then
watches the run and the pod together until one of them ends:

- run terminal, cancelling, rescheduled (a preempted pod's SIGTERM) or suspended → the pod is deleted;
- the pod failing its GPU health check (ow_prefect/runpod/health.py), or dying before the flow started without
  passing it (ERROR, a container exit, nothing within `startup_timeout`) → the pod is deleted, its GPU type in that
  data center cools down (ow_prefect/workers/cooldown.py) and the run gets a pod on the next candidate, up to
  `max_pod_attempts` (ow_prefect/workers/placement.py); then the run is Crashed naming every pod;
- pod in ERROR, its container exiting before the run finished, or the run not started within
  `startup_timeout`, after its check passed → the run is Crashed with the pod's last log lines, and the pod
  deleted;
- `max_runtime` passed → the run is Failed (TimedOut) and the pod deleted.

A reconciler (at start, then every `OW_RUNPOD_RECONCILE_SECONDS`) deletes pods of this work pool that no
worker watches and whose run is over, gone, rescheduled or past its `max_runtime`: a worker that died
mid-run leaves nothing billing for long. Every pod emits `ow.pod.created`, `ow.pod.running`, `ow.pod.healthy` or
`ow.pod.unhealthy` and `ow.pod.terminated` events related to its flow run, and its run gets a
`runpod-cost-<flow run id>` table artifact (price × time from create to delete, one row per pod over every attempt).

Like Prefect's own workers (prefect-aws's ECS worker), this module keeps the job variables, the job
configuration and the worker side by side, one concern read whole; what those workers do not have lives in rooms
of its own: the reconciler (`reconciler.py`), pod events and cost rows (`costs.py`) and the no-capacity message
(`capacity.py`).

The pod's environment holds only what the run needs: the Prefect API URL and its key or auth string, the flow
run id, `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`, `OW_STORAGE_BLOCK` / `OW_HF_*` when set, the
job's own `env`, two non-secret markers (work pool id, deadline) and what its health check expects. It is never
logged; pods are named
`ow-<flow run id>`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse
from uuid import UUID

import anyio
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, get_current_settings, temporary_settings
from prefect.states import Cancelled, Crashed, Failed
from prefect.utilities.engine import propose_state
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ow_prefect.errors import ConfigurationError, ParameterError
from ow_prefect.jobs.base import validation_problems
from ow_prefect.runpod.client import AsyncRunPodClient
from ow_prefect.runpod.credentials import RunPodCredentials
from ow_prefect.runpod.errors import RunPodError, RunPodNoCapacity, RunPodNotFound
from ow_prefect.runpod.health import Report, parse_report
from ow_prefect.runpod.models import Pod
from ow_prefect.runpod.offers import (
    CLOUDS,
    DEFAULT_VRAM_MARGIN,
    Candidate,
    create_on_first,
    find_offers,
    with_margin,
)
from ow_prefect.settings import get_settings
from ow_prefect.workers.capacity import _no_capacity_message
from ow_prefect.workers.cooldown import CooldownStore
from ow_prefect.workers.costs import CostAccounting, PodRecord
from ow_prefect.workers.placement import DEFAULT_MAX_POD_ATTEMPTS, HEALTH_LOG_LINES, VERIFIED, Placement
from ow_prefect.workers.reconciler import _GONE, DEADLINE_MARKER, POD_PREFIX, POOL_MARKER, PodReconciler

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
PORT_SPEC = re.compile(r"^\d{1,5}/(http|tcp)$")
DEFAULT_QUERY_SECONDS = 2.0  # GPU runs deserve a faster pick-up than Prefect's 10 s; PREFECT_WORKER_QUERY_SECONDS wins
CAPACITY_RETRY_SECONDS = (5.0, 60.0)  # first and longest pause between rounds while waiting for capacity
CANCEL_GRACE_SECONDS = 5.0  # lets the supervisor in the pod finish a cancellation it already saw
PREEMPT_GRACE_SECONDS = 60.0  # lets a pod that RunPod stopped reschedule its run through its SIGTERM handler
LOG_LINES_IN_MESSAGE = 15
LOG_LINES_LOGGED = 40
LOG_LINES_SEARCHED = 400  # for the first exception: a crash loop repeats it, Prefect's reactions follow it
ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Exit)\b.*: ")  # a Python exception's last line


class RunPodFields(BaseModel):
    """The `runpod` job variables, each defined once (default, bounds, title, description): `RunPodVariables` (the
    pool's form) and `RunPodJobConfiguration` (one run's resolved values) both inherit them, and Prefect derives
    each `{{ field }}` template of the base job template from the field's name (`BaseJobConfiguration.json_template`).
    """

    image: str = Field(
        default_factory=lambda: get_settings().train_image,
        title="Image",
        description="Container image of the pod; it must have Prefect and the flow's code. ow_prefect jobs set it.",
    )
    gpu_types: list[str] | Literal["verified"] = Field(
        default_factory=list,
        title="GPU types",
        description="RunPod GPU type ids to use, most preferred first (e.g. 'NVIDIA RTX A6000'), or 'verified': the "
        "types the images were verified on (ow_prefect/runpod/verified_gpus.json), cheapest first. Empty: the "
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
        description="Id of a RunPod network volume to mount at `volume_mount_path` (instead of a volume).",
    )
    volume_mount_path: str = Field(
        default="/workspace",
        title="Volume mount path",
        description="Where the volume (`volume_gb`) or network volume (`network_volume_id`) is mounted in the pod.",
    )
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
        description="Hard cap from pod creation: past it the run fails (TimedOut) and the pod is deleted.",
    )
    startup_timeout: int = Field(
        default=1200,
        ge=1,
        title="Startup timeout (seconds)",
        description="From pod creation until the flow run starts (image pull included); past it the pod is deleted: "
        "replaced on the next candidate when it never passed its GPU health check (max_pod_attempts), else Crashed.",
    )
    capacity_wait: int = Field(
        default=0,
        ge=0,
        title="Wait for capacity (seconds)",
        description="When no candidate has capacity, keep retrying this long instead of failing at once.",
    )
    max_pod_attempts: int = Field(
        default=DEFAULT_MAX_POD_ATTEMPTS,
        ge=1,
        le=10,
        title="Pods per run",
        description="A pod that fails its GPU health check, or dies before the flow starts, is deleted and the run "
        "tried on the next GPU type or data center, up to this many pods; then the run crashes naming each.",
    )
    credentials: RunPodCredentials | None = Field(
        default=None,
        title="RunPod credentials",
        description="A RunPod Credentials block; empty: RUNPOD_API_KEY in the worker's environment.",
    )


class RunPodVariables(RunPodFields, BaseVariables):
    """What a work pool, deployment or flow run may set (`job_variables`); shown as the pool's form."""


class RunPodJobConfiguration(RunPodFields, BaseJobConfiguration):
    """The resolved job variables of one flow run, and the pod request they make."""

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, ports: list[str]) -> list[str]:
        bad = [port for port in ports if not PORT_SPEC.match(port)]
        if bad:
            raise ValueError(f"ports {bad}: write each as '<port>/http' or '<port>/tcp', e.g. '8000/http'")
        return ports

    @model_validator(mode="after")
    def _one_volume(self) -> RunPodJobConfiguration:
        if self.volume_gb and self.network_volume_id:
            raise ValueError("set volume_gb or network_volume_id, not both (RunPod mounts one volume per pod)")
        return self

    @property
    def clouds(self) -> tuple[str, ...]:
        return CLOUDS if self.cloud == "ANY" else (self.cloud,)

    @property
    def preferred_gpu_types(self) -> list[str]:
        return [] if self.gpu_types == VERIFIED else self.gpu_types

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
        body: dict[str, Any] = {
            "name": name,
            "image": self.image,
            "args": self.command or "prefect flow-run execute",
            "env": {**self.env, DEADLINE_MARKER: str(int(deadline))},
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
    allowed = set(RunPodVariables.model_fields) - {"credentials"}
    problems = [f"{name}: not a runpod job variable" for name in sorted(set(variables) - allowed)]
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
class Outcome:
    """How a watch ended: the state to set before and after deleting the pod, and the worker's exit code."""

    reason: str
    before_delete: Any = None  # a state proposed (forced) before the delete: final states block a reschedule
    after_delete: Any = None  # a state forced once the pod is gone (Crashed does not block a reschedule)
    status_code: int = 0
    elsewhere: bool = False  # the pod failed before its flow started, not through its command: try another one
    log_tail: str = ""


class RunPodWorker(
    PodReconciler, CostAccounting, BaseWorker[RunPodJobConfiguration, RunPodVariables, RunPodWorkerResult]
):
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
        placement = self._placement(configuration, logger)
        async with credentials.get_client() as runpod:
            while True:  # one pod, or more while pods fail before their flow starts (ow_prefect/workers/placement.py)
                try:
                    created = await self._create(runpod, flow_run, configuration, request, logger, placement)
                except RunPodNoCapacity as exc:  # expected: one line, not a traceback
                    if not placement.attempts:
                        state = Failed(name="NoCapacity", message=str(exc))
                        return await self._refuse(flow_run, state, logger, task_status)
                    message = f"{placement.failures()} No other GPU type or data center is left to try: {exc}"
                    logger.error(message)
                    await self._force_state(flow_run.id, Crashed(message=message), logger)
                    return RunPodWorkerResult(identifier=placement.attempts[-1].pod, status_code=1)
                if created is None:  # cancelled while waiting for capacity
                    if task_status and not placement.attempts:
                        task_status.started("")
                    return RunPodWorkerResult(identifier="", status_code=0)
                pod, candidate = created
                record = PodRecord.of(pod, flow_run, candidate)
                self._watched[pod.id] = flow_run.id
                await self._report_infrastructure(flow_run, pod, task_status, placement, logger)
                logger.info(f"Pod {pod.id} created: {candidate}, data center {pod.data_center_id or 'any'}")
                pod_attempt = len(placement.attempts) + 1
                self._emit("ow.pod.created", record, attempt=flow_run.run_count + 1, pod_attempt=pod_attempt)
                try:
                    outcome = await self._watch(runpod, flow_run, configuration, record, deadline, logger, placement)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        logger.warning(f"Worker stopping: pod {pod.id} keeps running; a restarted worker reconciles it")
                        self._watched.pop(pod.id, None)
                        raise
                    logger.exception(f"Watching pod {pod.id} failed; deleting it")
                    reason = f"the worker failed while watching it: {type(exc).__name__}: {exc}"
                    outcome = Outcome(reason, after_delete=Crashed(message=f"Pod {pod.id}: {reason}"), status_code=1)
                if outcome.elsewhere:
                    await placement.failed(pod, record.gpu, record.cloud, outcome.reason, record.created_at)
                    if len(placement.attempts) < configuration.max_pod_attempts:
                        logger.warning(
                            f"Pod {pod.id} failed before the flow started: {outcome.reason}. Deleting it; trying the "
                            f"next candidate (pod {pod_attempt + 1} of at most {configuration.max_pod_attempts})"
                        )
                        retried = Outcome(f"{outcome.reason} (tried elsewhere)", elsewhere=True)
                        await self._end(runpod, record, retried, logger)
                        continue
                    outcome = self._out_of_attempts(placement, configuration, outcome)
                await self._end(runpod, record, outcome, logger)
                return RunPodWorkerResult(identifier=pod.id, status_code=outcome.status_code)

    def _placement(self, configuration: RunPodJobConfiguration, logger: Any) -> Placement:
        return Placement(
            configuration.image,
            store=CooldownStore(self.client),
            min_cuda=configuration.min_cuda_version,
            container_disk_gb=configuration.container_disk_gb,
            verified_only=configuration.gpu_types == VERIFIED,
            log=logger.info,
        )

    async def _report_infrastructure(
        self, flow_run: FlowRun, pod: Pod, task_status: Any, placement: Placement, logger: Any
    ) -> None:
        """The run's infrastructure is its pod: said once with `started`, then updated for each new pod."""
        if not placement.attempts:
            if task_status:
                task_status.started(f"{INFRA_PREFIX}{pod.id}")
            return
        try:
            await self.client.update_flow_run(flow_run.id, infrastructure_pid=f"{INFRA_PREFIX}{pod.id}")
        except Exception as exc:  # the watch deletes the pod all the same; only the UI shows the old id
            logger.warning(f"Could not record pod {pod.id} as the run's infrastructure ({exc})")

    def _out_of_attempts(self, placement: Placement, configuration: RunPodJobConfiguration, last: Outcome) -> Outcome:
        message = (
            f"{placement.failures()} max_pod_attempts ({configuration.max_pod_attempts}) reached. Last lines of the "
            f"last pod's log:\n{last.log_tail}"
        )
        return Outcome(last.reason, after_delete=Crashed(message=message), status_code=1)

    async def _refuse(
        self, flow_run: FlowRun, state: Any, logger: Any, task_status: anyio.abc.TaskStatus | None
    ) -> RunPodWorkerResult:
        """End a run that cannot get a pod (no capacity, no credentials): its state says why, the log one line."""
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
        placement: Placement,
    ) -> tuple[Pod, Candidate] | None:
        """Walk the candidates, cheapest first, until one has capacity; wait for capacity if configured. The
        placement leaves out the types and data centers that failed (and unverified types when asked)."""
        give_up = time.monotonic() + configuration.capacity_wait
        fresh = False
        pause = CAPACITY_RETRY_SECONDS[0]
        while True:
            ranking = await find_offers(
                runpod,
                min_vram_gb=with_margin(configuration.min_vram_gb, configuration.vram_margin),
                gpu_count=configuration.gpu_count,
                preferred=configuration.preferred_gpu_types,
                clouds=configuration.clouds,
                max_price_per_hour=configuration.max_price_per_hour,
                data_centers=configuration.data_center_ids,
                min_cuda_version=configuration.min_cuda_version,
                data_center_min_cuda_version=configuration.data_center_min_cuda_version,
                fresh=fresh,
            )
            ranking.candidates = await placement.candidates(runpod, ranking.candidates, configuration.data_center_ids)
            ranking.removed |= placement.skipped
            try:
                return await create_on_first(
                    runpod, request, ranking.candidates, log=logger.info, request_for=placement.request_for
                )
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
        placement: Placement,
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
                if not flow_started and state.type not in (StateType.PENDING, StateType.SCHEDULED):
                    flow_started = True
                    await self._flow_started(runpod, record, placement, logger)
            if time.time() >= deadline:
                message = f"The run exceeded max_runtime ({configuration.max_runtime} s); pod {pod.id} deleted."
                return Outcome(
                    "max_runtime passed", before_delete=Failed(name="TimedOut", message=message), status_code=1
                )
            if not flow_started and time.monotonic() - created >= configuration.startup_timeout:
                reason = f"the flow run did not start within startup_timeout ({configuration.startup_timeout} s)"
                return await self._before_start(runpod, flow_run, record, reason, logger)
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
                    if pod.status == "ERROR" and not flow_started:
                        return await self._before_start(runpod, flow_run, record, "the pod is in ERROR", logger)
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
                            if flow_started or state.type not in (StateType.PENDING, StateType.SCHEDULED):
                                return await self._crash(runpod, flow_run, pod, reason, logger)
                            return await self._before_start(runpod, flow_run, record, reason, logger)
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

    # ---- before the flow starts: the GPU health check (ow_prefect/runpod/health.py, workers/placement.py) -------

    async def _flow_started(
        self, runpod: AsyncRunPodClient, record: PodRecord, placement: Placement, logger: Any
    ) -> None:
        """The pod works: its health report becomes an event, and its (type, data center, image) leaves the
        cooldown."""
        report = parse_report(await _last_log_lines(runpod, record.pod_id, HEALTH_LOG_LINES))
        if report is not None:
            self._emit_health(record, report, logger)
        await placement.started(record.pod, record.created_at)

    async def _before_start(
        self, runpod: AsyncRunPodClient, flow_run: FlowRun, record: PodRecord, reason: str, logger: Any
    ) -> Outcome:
        """A pod that failed before its flow started. Its health check passed: the command or the image is at
        fault, the run crashes as always. Else (the check failed, or never reported): try another pod."""
        lines = await _last_log_lines(runpod, record.pod_id, HEALTH_LOG_LINES)
        report = parse_report(lines)
        if report is not None:
            self._emit_health(record, report, logger)
            if report.ok:
                return await self._crash(runpod, flow_run, record.pod, reason, logger)
            reason = f"its GPU health check failed: {'; '.join(report.problems)}"
        tail = "\n".join(lines[-LOG_LINES_IN_MESSAGE:]) or "(the pod wrote no log lines)"
        return Outcome(reason, status_code=1, elsewhere=True, log_tail=tail)

    def _emit_health(self, record: PodRecord, report: Report, logger: Any) -> None:
        (logger.info if report.ok else logger.error)(f"Pod {record.pod_id}: {report.summary()}")
        payload = {
            "ok": report.ok,
            "problems": report.problems,
            "gpus_seen": report.gpus,
            "driver": report.driver,
            "cuda": report.cuda,
            "torch": report.torch,
            "disk_free_gb": report.disk_free_gb,
        }
        self._emit("ow.pod.healthy" if report.ok else "ow.pod.unhealthy", record, **payload)

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
            wait = outcome.after_delete is not None or outcome.elsewhere  # no SIGTERM handler may touch the run after
            deleted = await self._delete(runpod, record.pod_id, logger, wait=wait)
            if outcome.after_delete is not None:
                await self._force_state(flow_run_id, outcome.after_delete, logger)
        finally:
            self._watched.pop(record.pod_id, None)
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


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["RunPodJobConfiguration", "RunPodVariables", "RunPodWorker", "RunPodWorkerResult"]

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
- `max_runtime` passed → the run is Failed (TimedOut) and the pod deleted;
- `max_cost` reached (the pod's price × time) → the run is Failed (CostCapped) and the pod deleted. Before either, a
  fine-tune is asked to save a checkpoint (workers/stopping.py), so that a rerun resumes.

Before the first pod, the worker estimates the run (ow_prefect/costs: the GPU it would take, runtime from the job's
tokens, cost range) into a `runpod-estimate-<flow run id>` artifact and refuses a run whose expected cost is above
`max_cost`; before each pod, it refuses every run of a pool whose `daily_budget` is spent. A network volume holds
the Hugging Face cache (`HF_HOME`) and vLLM's (`VLLM_CACHE_ROOT`); `cache_volume_ids` makes the worker prefer the
data centers that hold one (ow_prefect/runpod/volumes.py).

A reconciler (at start, then every `OW_RUNPOD_RECONCILE_SECONDS`) deletes pods of this work pool that no
worker watches and whose run is over, gone, rescheduled or past its `max_runtime` or `max_cost`: a worker that died
mid-run leaves nothing billing for long. Every pod emits `ow.pod.created`, `ow.pod.running`, `ow.pod.healthy` or
`ow.pod.unhealthy` and `ow.pod.terminated` events related to its flow run, and its run gets a
`runpod-cost-<flow run id>` table artifact (price × time from create to delete, one row per pod over every attempt).

Like Prefect's own workers (prefect-aws's ECS worker), this module keeps the job variables, the job
configuration and the worker side by side, one concern read whole; what those workers do not have lives in rooms
of its own: the reconciler (`reconciler.py`), pod events, cost rows and the cost cap (`costs.py`), the pod create
and the no-capacity message (`capacity.py`), a run's pods and their GPU health check (`attempts.py`, with
`placement.py` and `cooldown.py`), the watch of a run and its pod (`watch.py`), stopping a run at a checkpoint
(`stopping.py`) and the warm hand-off of a pod to the next run (`handoff.py`).

The pod's environment holds only what the run needs: the Prefect API URL and its key or auth string, the flow
run id, `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`, `OW_STORAGE_BLOCK` / `OW_HF_*` when set, the
job's own `env`, two non-secret markers (work pool id, deadline) and what its health check expects. It is never
logged; pods are named
`ow-<flow run id>`.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Sequence
from typing import Any, Literal
from uuid import UUID

import anyio
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, get_current_settings, temporary_settings
from prefect.states import Crashed, Failed
from prefect.utilities.engine import propose_state
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ow_prefect.costs.guard import RunCosts
from ow_prefect.errors import ConfigurationError, ParameterError
from ow_prefect.jobs.base import validation_problems
from ow_prefect.runpod.agent import KEEP_WARM_ENV
from ow_prefect.runpod.client import AsyncRunPodClient
from ow_prefect.runpod.credentials import RunPodCredentials
from ow_prefect.runpod.errors import RunPodError, RunPodNoCapacity, RunPodNotFound
from ow_prefect.runpod.offers import CLOUDS, DEFAULT_VRAM_MARGIN, Ranking, find_offers, with_margin
from ow_prefect.runpod.volumes import cache_env
from ow_prefect.settings import get_settings
from ow_prefect.workers.attempts import INFRA_PREFIX, Outcome, PodAttempts
from ow_prefect.workers.capacity import PodCreation
from ow_prefect.workers.costs import MAX_COST_MARKER, CostAccounting, PodRecord, RunLocks
from ow_prefect.workers.handoff import HANDOFF_START_TIMEOUT, WarmHandoff, WarmPod, fit_key
from ow_prefect.workers.placement import DEFAULT_MAX_POD_ATTEMPTS, VERIFIED, Placement
from ow_prefect.workers.preflight import Preflight
from ow_prefect.workers.reconciler import DEADLINE_MARKER, POD_PREFIX, POOL_MARKER, PodReconciler
from ow_prefect.workers.stopping import CheckpointStop
from ow_prefect.workers.watch import PodWatch

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
ESTIMATE_TIMEOUT_SECONDS = 60.0  # the estimate reads the data files' sizes and the model's config: never wait longer
PORT_SPEC = re.compile(r"^\d{1,5}/(http|tcp)$")
DEFAULT_QUERY_SECONDS = 2.0  # GPU runs deserve a faster pick-up than Prefect's 10 s; PREFECT_WORKER_QUERY_SECONDS wins


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
        description="Id of a RunPod network volume to mount at `volume_mount_path` (instead of a volume); the pod "
        "runs in its data center, and the Hugging Face cache (HF_HOME) and vLLM's compile cache (VLLM_CACHE_ROOT) "
        "live on it.",
    )
    cache_volume_ids: list[str] = Field(
        default_factory=list,
        title="Model cache volumes",
        description="RunPod network volumes (one per data center) that hold the Hugging Face cache: offers in their "
        "data centers are tried first, with the volume at `volume_mount_path` and HF_HOME (and VLLM_CACHE_ROOT) on "
        "it, so a model an earlier pod downloaded there is not downloaded again, nor compiled again by vLLM; with no "
        "capacity there, the pod runs elsewhere without a cache.",
    )
    volume_mount_path: str = Field(
        default="/workspace",
        title="Volume mount path",
        description="Where the volume (`volume_gb`) or network volume (`network_volume_id`, `cache_volume_ids`) is "
        "mounted in the pod.",
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
        description="From pod creation until the flow run starts (image pull included); past it the pod is deleted: "
        "replaced on the next candidate when it never passed its GPU health check (max_pod_attempts), else Crashed.",
    )
    capacity_wait: int = Field(
        default=0,
        ge=0,
        title="Wait for capacity (seconds)",
        description="When no candidate has capacity, keep retrying this long instead of failing at once.",
    )
    keep_warm_seconds: int = Field(
        default=0,
        ge=0,
        le=3600,
        title="Keep warm (seconds)",
        description="After a run completes, keep its pod up to this long for the next run of the pool that fits it "
        "(same image, env, volume and placement; enough GPU memory), which then starts at once on it: no boot, no "
        "image pull. The pod waits only when a follower is expected (one queued in the pool, or runs of this shape "
        "arriving within this time of each other); the run that kept it pays its warm time. 0: delete at once.",
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
        volumes = [name for name in ("volume_gb", "network_volume_id", "cache_volume_ids") if getattr(self, name)]
        if len(volumes) > 1:
            raise ValueError(f"set one of {' and '.join(volumes)}, not both (RunPod mounts one volume per pod)")
        return self

    @property
    def clouds(self) -> tuple[str, ...]:
        return CLOUDS if self.cloud == "ANY" else (self.cloud,)

    @property
    def preferred_gpu_types(self) -> list[str]:
        return [] if self.gpu_types == VERIFIED else self.gpu_types

    async def find_offers(
        self, runpod: AsyncRunPodClient, *, fresh: bool = False, data_centers: Sequence[str] | None = None
    ) -> Ranking:
        """The offers this run may take, in the order the worker tries them (`data_centers`: only those), and why
        the others were left out. The worker's create and the cost estimate (ow_prefect/costs) both use it."""
        return await find_offers(
            runpod,
            min_vram_gb=with_margin(self.min_vram_gb, self.vram_margin),
            gpu_count=self.gpu_count,
            preferred=self.preferred_gpu_types,
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
        if self.keep_warm_seconds:  # the pod runs the warm agent (ow_prefect/runpod/agent.py)
            env[KEEP_WARM_ENV] = str(self.keep_warm_seconds)
        if self.network_volume_id:  # the caches on the volume; a job's own HF_HOME or VLLM_CACHE_ROOT wins
            env = {**cache_env(self.volume_mount_path), **env}
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


class RunPodWorker(
    PodWatch,
    WarmHandoff,
    PodReconciler,
    CostAccounting,
    CheckpointStop,
    PodAttempts,
    PodCreation,
    Preflight,
    BaseWorker[RunPodJobConfiguration, RunPodVariables, RunPodWorkerResult],
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
        self._stopping: set[UUID] = set()  # runs asked to stop at a checkpoint (workers/stopping.py)
        self._assigned_at: dict[str, float] = {}  # pod id -> when it was handed to the run it serves now
        self._cost_row_locks = RunLocks()  # a run's cost rows are added one at a time (workers/costs.py)
        self._init_handoff()  # warm pods and what they fit (workers/handoff.py)

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
            costs = RunCosts(self.client, self._work_pool, flow_run, configuration, logger)
            live_pods = functools.partial(self._live_pod_costs, runpod)
            if (refused := await costs.refusal(runpod, ESTIMATE_TIMEOUT_SECONDS, live_pods)) is not None:
                return await self._refuse(flow_run, refused, logger, task_status)
            fit = fit_key(configuration, credentials)
            self._noted_arrival(fit, flow_run, configuration.keep_warm_seconds)
            if (warm := await self._take_warm_pod(flow_run, configuration, fit, logger)) is not None:
                result = await self._run_on_warm_pod(
                    runpod, warm, flow_run, configuration, placement, task_status, logger
                )
                if result is not None:
                    return result
                task_status = _Reported(self.client, flow_run.id)  # the run's infrastructure was said once already
            while True:  # one pod, or more while pods fail before their flow starts (ow_prefect/workers/placement.py)
                if placement.attempts and (refused := await costs.budget_refusal(live_pods)) is not None:
                    return await self._refuse(flow_run, refused, logger, None)  # the run's infrastructure was said
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
                pod, candidate, choice = created
                record = PodRecord.of(pod, flow_run, candidate)
                self._watched[pod.id] = flow_run.id
                if configuration.keep_warm_seconds:
                    self._agent_pods[pod.id] = fit
                await self._report_infrastructure(flow_run, pod, task_status, placement, logger)
                logger.info(f"Pod {pod.id} created: {candidate}, data center {pod.data_center_id or 'any'}")
                pod_attempt = len(placement.attempts) + 1
                self._emit("ow.pod.created", record, attempt=flow_run.run_count + 1, pod_attempt=pod_attempt)
                await costs.publish(candidate, choice.cached)
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
                await self._finish(runpod, record, flow_run, outcome, configuration, logger)
                return RunPodWorkerResult(identifier=pod.id, status_code=outcome.status_code)

    async def _run_on_warm_pod(
        self,
        runpod: AsyncRunPodClient,
        warm: WarmPod,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        placement: Placement,
        task_status: anyio.abc.TaskStatus | None,
        logger: Any,
    ) -> RunPodWorkerResult | None:
        """Run on a warm pod handed over from another run (workers/handoff.py); None: it did not take the run (the
        pod is deleted), and the run gets a new pod."""
        deadline = time.time() + configuration.max_runtime
        record, written = await self._assign(warm, flow_run, configuration, deadline, logger)
        pod_id = record.pod_id
        self._agent_pods[pod_id] = warm.fit
        self._assigned_at[pod_id] = record.created_at
        if not written:
            await self._end(runpod, record, Outcome("its assignment could not be written", elsewhere=True), logger)
            return None
        if task_status:
            task_status.started(f"{INFRA_PREFIX}{pod_id}")
        logger.info(
            f"Pod {pod_id} ({record.gpu}) handed over from flow run {warm.record.flow_run_name}: no new pod, no boot"
        )
        startup = min(configuration.startup_timeout, HANDOFF_START_TIMEOUT)
        try:
            outcome = await self._watch(runpod, flow_run, configuration, record, deadline, logger, placement, startup)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                logger.warning(f"Worker stopping: pod {pod_id} keeps running; a restarted worker reconciles it")
                self._watched.pop(pod_id, None)
                raise
            logger.exception(f"Watching pod {pod_id} failed; deleting it")
            reason = f"the worker failed while watching it: {type(exc).__name__}: {exc}"
            outcome = Outcome(reason, after_delete=Crashed(message=f"Pod {pod_id}: {reason}"), status_code=1)
        if not record.flow_started and _is_pending(await self._state(flow_run.id, logger)):
            logger.warning(f"Warm pod {pod_id} did not start the run ({outcome.reason}); deleting it for a new pod")
            not_started = Outcome(f"it did not start the run: {outcome.reason}", elsewhere=True)
            await self._end(runpod, record, not_started, logger)
            if _is_pending(await self._state(flow_run.id, logger)):
                return None
            return RunPodWorkerResult(identifier=pod_id, status_code=0)
        await self._finish(runpod, record, flow_run, outcome, configuration, logger)
        return RunPodWorkerResult(identifier=pod_id, status_code=outcome.status_code)

    async def _finish(
        self,
        runpod: AsyncRunPodClient,
        record: PodRecord,
        flow_run: FlowRun,
        outcome: Outcome,
        configuration: RunPodJobConfiguration,
        logger: Any,
    ) -> None:
        """The run's time on the pod is over: hand the pod to the next run that fits (workers/handoff.py), or delete
        it."""
        if outcome.reusable and await self._keep_warm(runpod, record, flow_run, configuration, logger):
            return
        if record.warm_idle:
            outcome.reason = f"{outcome.reason}; kept warm {record.warm_idle:.0f} s, no run came"
        if outcome.reusable:
            self._noted_end(self._agent_pods.get(record.pod_id))
        await self._end(runpod, record, outcome, logger)

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
            self._assigned_at.pop(record.pod_id, None)
            if self._agent_pods.pop(record.pod_id, None) is not None:
                await self._clear_assignment(record.pod_id)
            await self._clear_stop(flow_run_id)
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
        """Delete the run's pod; a pod that is already gone (404) counts as done. A pod handed on to a later run
        (workers/handoff.py) is that run's now: cancelling the earlier run leaves it alone."""
        from prefect.exceptions import InfrastructureNotFound

        if not infrastructure_pid.startswith(INFRA_PREFIX):
            raise InfrastructureNotFound(f"{infrastructure_pid!r} is not a RunPod pod of this worker")
        pod_id = infrastructure_pid.removeprefix(INFRA_PREFIX)
        current = await self._serves_another_run(pod_id, configuration.env.get("PREFECT__FLOW_RUN_ID"))
        if current is not None:
            raise InfrastructureNotFound(f"pod {pod_id} was handed on to flow run {current}; it is not this run's")
        async with configuration.runpod_credentials().get_client() as runpod:
            await runpod.delete_pod(pod_id)

    # ---- helpers -------------------------------------------------------------------------------------

    @property
    def _poll(self) -> float:
        return get_settings().runpod_poll_seconds

    def _remember(self, credentials: RunPodCredentials) -> None:
        key = (credentials.api_url, credentials.api_key.get_secret_value())
        self._credentials.setdefault(key, credentials)

    def _warn_once(self, logger: Any, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _is_pending(state: Any) -> bool:
    return hasattr(state, "is_pending") and state.is_pending()


class _Reported:
    """What a run's submission reports once its infrastructure was said: a new pod updates the run's
    infrastructure id instead (anyio's `task_status.started` may be called only once)."""

    def __init__(self, client: Any, flow_run_id: UUID) -> None:
        self.client, self.flow_run_id = client, flow_run_id

    def started(self, value: str) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.client.update_flow_run(self.flow_run_id, infrastructure_pid=value)
        )


__all__ = ["RunPodJobConfiguration", "RunPodVariables", "RunPodWorker", "RunPodWorkerResult"]

"""Warm hand-off: a room of the `runpod` worker (workers/runpod.py). A pod whose run completed is given to the next
run that fits it, instead of one pod deleted and another created (the next run skips the pod's boot: image pull,
container start, health check).

Only pods created with `keep_warm_seconds` > 0 take part: they run the agent (ow_prefect/runpod/agent.py), which
runs its assigned flow run and then waits for the next one. With 0 (the default) nothing changes.

- **When a pod is kept warm.** Its run Completed (a crash, a failure, a cancel, a reschedule, a cap: deleted as
  before), and there is a reason to expect a follower: a run of the same deployment with the same job variables
  waits in the pool (a sweep queued behind a concurrency limit), a run of this worker is waiting for such a pod,
  or this worker saw runs of this shape arrive within `keep_warm_seconds` of an earlier one's end in the last
  hour (a researcher's loop). Otherwise the pod is deleted at once: a lone run, or a sparse pool, bills exactly
  what it does with `keep_warm_seconds` 0. A kept pod waits at most `keep_warm_seconds`.
- **What fits.** The same pod request (image, command, env but the run's own markers, disk, ports, volume,
  registry credential), the same placement constraints (GPU types, count, cloud, data centers, price cap, CUDA
  floors, cache volumes), the same RunPod account, and the pod's GPU memory ≥ the run's `min_vram_gb` plus its
  margin. Anything else differs: no hand-off.
- **How a run gets it.** The run is claimed the normal way (the worker's poll proposes Pending, so no other worker
  takes it); its `run()` takes a fitting warm pod of this worker, checks the run is still Pending, and writes the
  pod's assignment, the Prefect Variable `ow-pod-<pod id>` = {flow_run_id, assigned_at, deadline, max_cost,
  work_pool_id, handed_from}. The pod only reads it. The run's infrastructure is `runpod::<pod id>`; the watch,
  `max_runtime` (from the hand-over), `max_cost` (price × time from the hand-over), cancel and preemption work as
  for a new pod. A pod that does not start the run within `HANDOFF_START_TIMEOUT` is deleted and the run gets a
  new pod.
- **Who pays.** Each run's cost row covers its time on the pod: from the create (or its hand-over) to the delete
  (or the next hand-over), its warm idle time included (the run that kept the pod warm pays for it, shown as
  `warm_idle_s`). The reconciler reads the assignment: a pod warm until `warm_until`, or serving the run its
  assignment names, is not an orphan (ow_prefect/workers/reconciler.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ow_prefect.costs.budget import HANDED_OFF_EVENT
from ow_prefect.runpod.agent import KEEP_WARM_ENV, assignment_variable
from ow_prefect.runpod.errors import RunPodError, RunPodNotFound
from ow_prefect.runpod.offers import with_margin
from ow_prefect.workers.costs import MAX_COST_MARKER, PodRecord
from ow_prefect.workers.reconciler import DEADLINE_MARKER

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.workers.runpod import RunPodJobConfiguration

HANDOFF_START_TIMEOUT = 120.0  # a warm pod that has not started its new run by then is deleted; the run gets a new one
BURST_MEMORY_SECONDS = 3600.0  # how long a burst seen keeps this worker keeping pods of that shape warm
FINISHING_WAIT_SECONDS = 5.0  # how long a new run waits for a fitting pod whose run just ended to turn warm
RUN_SPECIFIC_ENV = frozenset({"PREFECT__FLOW_RUN_ID", DEADLINE_MARKER, MAX_COST_MARKER, KEEP_WARM_ENV})
PLACEMENT_FIELDS = frozenset(
    {
        "gpu_types",
        "gpu_count",
        "cloud",
        "data_center_ids",
        "max_price_per_hour",
        "min_cuda_version",
        "data_center_min_cuda_version",
        "cache_volume_ids",
    }
)


def fit_key(configuration: RunPodJobConfiguration, credentials: RunPodCredentials) -> str:
    """What a run needs of a pod, but its GPU memory: two runs with the same key may share a pod."""
    request = configuration.pod_request("", 0)
    request["env"] = {name: value for name, value in request["env"].items() if name not in RUN_SPECIFIC_ENV}
    placement = configuration.model_dump(mode="json", include=set(PLACEMENT_FIELDS))
    account = [credentials.api_url, hashlib.sha256(credentials.api_key.get_secret_value().encode()).hexdigest()]
    return json.dumps([request, placement, account], sort_keys=True, default=str)


@dataclass
class WarmPod:
    """A pod whose run completed, waiting for the next run that fits."""

    record: PodRecord  # the run that used it last (it pays the warm time)
    fit: str
    memory_gb: float  # over all its GPUs
    until: float
    adopted: asyncio.Event = field(default_factory=asyncio.Event)
    adopter: FlowRun | None = None


class WarmHandoff:
    """Keeping pods warm and handing them over, a mixin of `RunPodWorker` (whose `client`, `_state`, `_poll`,
    `_watched`, `_account`, `_work_pool` and `_delete` it uses)."""

    def _init_handoff(self) -> None:
        self._warm: dict[str, WarmPod] = {}  # pod id -> a pod waiting for its next run
        self._agent_pods: dict[str, str] = {}  # pod id -> fit key, for the watched pods that run the agent
        self._adopters: dict[str, int] = {}  # fit key -> runs of this worker waiting for such a pod
        self._last_end: dict[str, float] = {}  # fit key -> when a run of that shape last ended on a deleted pod
        self._bursty: dict[str, float] = {}  # fit key -> until when to keep such pods warm

    # ---- the run that ends -----------------------------------------------------------------------------

    async def _keep_warm(
        self, runpod: AsyncRunPodClient, record: PodRecord, flow_run: FlowRun, configuration: Any, logger: Any
    ) -> bool:
        """Keep a pod whose run completed warm for the next run that fits, up to `keep_warm_seconds`, when one is
        to be expected. True: handed over (its run's cost row is written); False: the caller deletes it."""
        fit = self._agent_pods.get(record.pod_id)
        keep = configuration.keep_warm_seconds
        if fit is None or keep <= 0 or not await self._follower_expected(fit, flow_run, keep):
            return False
        started = time.time()
        warm = WarmPod(record, fit, record.memory_gb, started + keep)
        self._warm[record.pod_id] = warm
        assignment = {"flow_run_id": str(record.flow_run_id), "warm_until": warm.until, **self._pool_marker()}
        if not await self._write_assignment(record.pod_id, assignment, logger):
            self._warm.pop(record.pod_id, None)
            return False
        logger.info(f"Pod {record.pod_id} kept warm for up to {keep} s for the next run that fits")
        while time.time() < warm.until and warm.adopter is None:
            with anyio.move_on_after(min(self._poll, max(0.0, warm.until - time.time()))):
                await warm.adopted.wait()
            if warm.adopter is None and not await self._still_up(runpod, record, logger):
                break
        if self._warm.get(record.pod_id) is warm:
            del self._warm[record.pod_id]
        record.warm_idle = time.time() - started
        if warm.adopter is None:
            return False
        reason = f"handed over to flow run {warm.adopter.name} after {record.warm_idle:.0f} s warm"
        logger.info(f"Pod {record.pod_id} {reason}")
        await self._account(record, reason, logger, event=HANDED_OFF_EVENT, handed_to=str(warm.adopter.id))
        return True

    async def _follower_expected(self, fit: str, flow_run: FlowRun, keep: float) -> bool:
        if self._adopters.get(fit) or self._bursty.get(fit, 0.0) > time.time():
            return True
        return await self._queued_like(flow_run, keep)

    async def _queued_like(self, flow_run: FlowRun, keep: float) -> bool:
        """Whether a run of the same deployment, with the same job variables, waits in this pool to start within
        `keep` seconds (e.g. queued behind the deployment's concurrency limit)."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterId,
            FlowRunFilterState,
            FlowRunFilterStateType,
            WorkPoolFilter,
            WorkPoolFilterId,
        )
        from prefect.client.schemas.objects import StateType

        if flow_run.deployment_id is None or self._work_pool is None:
            return False
        try:
            waiting = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(not_any_=[flow_run.id]),
                    deployment_id=FlowRunFilterDeploymentId(any_=[flow_run.deployment_id]),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
                    ),
                ),
                work_pool_filter=WorkPoolFilter(id=WorkPoolFilterId(any_=[self._work_pool.id])),
                limit=20,
            )
        except Exception:  # noqa: BLE001 - the API is busy: no hand-off this time
            return False
        horizon = time.time() + keep
        return any(
            (run.job_variables or {}) == (flow_run.job_variables or {})
            and run.infrastructure_pid is None
            and (run.expected_start_time is None or run.expected_start_time.timestamp() <= horizon)
            for run in waiting
        )

    async def _still_up(self, runpod: AsyncRunPodClient, record: PodRecord, logger: Any) -> bool:
        """A warm pod RunPod stopped or deleted (a preemption) is given up."""
        try:
            pod = await runpod.get_pod(record.pod_id)
        except RunPodNotFound:
            logger.warning(f"Warm pod {record.pod_id} was deleted outside the worker")
            return False
        except RunPodError:
            return True  # not known now: look again
        if pod.status in ("EXITED", "TERMINATED", "ERROR") or not pod.started:
            logger.warning(f"Warm pod {record.pod_id} stopped ({pod.status}); deleting it")
            return False
        return True

    def _noted_end(self, fit: str | None) -> None:
        """A run of this shape ended and its pod was deleted: a run of the same shape soon after is a burst."""
        if fit is not None:
            self._last_end[fit] = time.time()

    def _noted_arrival(self, fit: str, flow_run: FlowRun, keep: float) -> None:
        ended = self._last_end.get(fit)
        created = flow_run.created.timestamp() if flow_run.created else time.time()
        if keep > 0 and ended is not None and 0 <= created - ended <= keep:
            self._bursty[fit] = time.time() + BURST_MEMORY_SECONDS

    # ---- the run that starts ---------------------------------------------------------------------------

    async def _take_warm_pod(
        self, flow_run: FlowRun, configuration: RunPodJobConfiguration, fit: str, logger: Any
    ) -> WarmPod | None:
        """A warm pod of this worker that fits this run, taken for it (the run still Pending); or None."""
        need = with_margin(configuration.min_vram_gb, configuration.vram_margin)

        def fitting() -> WarmPod | None:
            found = [w for w in self._warm.values() if w.fit == fit and w.memory_gb >= need and time.time() < w.until]
            return min(found, key=lambda w: w.memory_gb) if found else None

        warm = fitting()
        if warm is None and await self._finishing(fit):
            self._adopters[fit] = self._adopters.get(fit, 0) + 1
            try:
                with anyio.move_on_after(FINISHING_WAIT_SECONDS):
                    while (warm := fitting()) is None:
                        await anyio.sleep(0.2)
            finally:
                self._adopters[fit] -= 1
        if warm is None:
            return None
        state = await self._state(flow_run.id, logger)
        if state is None or not hasattr(state, "is_pending") or not state.is_pending():
            return None  # cancelled (or unknown) meanwhile: leave the pod to the next one
        if self._warm.get(warm.record.pod_id) is not warm:
            return None
        del self._warm[warm.record.pod_id]  # with the next line, one step: the waiting run sees it taken
        warm.adopter = flow_run
        warm.adopted.set()
        return warm

    async def _finishing(self, fit: str) -> bool:
        """Whether a pod of this shape that this worker watches has a run that just ended (it turns warm soon)."""
        for pod_id, pod_fit in list(self._agent_pods.items()):
            if pod_fit != fit or pod_id in self._warm or pod_id not in self._watched:
                continue
            state = await self._state(self._watched[pod_id])
            if state is not None and hasattr(state, "is_completed") and state.is_completed():
                return True
        return False

    async def _assign(
        self, warm: WarmPod, flow_run: FlowRun, configuration: RunPodJobConfiguration, deadline: float, logger: Any
    ) -> tuple[PodRecord, bool]:
        """Write the pod's new assignment: the record of its time with this run, and whether it was written."""
        previous = warm.record
        record = PodRecord(
            previous.pod,
            flow_run.id,
            flow_run.name,
            previous.price_per_hour,
            gpu=previous.gpu,
            cloud=previous.cloud,
            memory_gb=previous.memory_gb,
            handed_from=previous.flow_run_id,
        )
        assignment = {
            "flow_run_id": str(flow_run.id),
            "assigned_at": record.created_at,
            "deadline": deadline,
            "max_cost": configuration.max_cost,
            "handed_from": str(previous.flow_run_id),
            **self._pool_marker(),
        }
        self._watched[record.pod_id] = flow_run.id
        return record, await self._write_assignment(record.pod_id, assignment, logger)

    # ---- the assignment Variable -----------------------------------------------------------------------

    def _pool_marker(self) -> dict[str, str]:
        return {"work_pool_id": str(self._work_pool.id)} if self._work_pool is not None else {}

    async def _write_assignment(self, pod_id: str, value: dict[str, Any], logger: Any) -> bool:
        from prefect.variables import Variable

        try:
            await Variable.aset(assignment_variable(pod_id), value, overwrite=True)
        except Exception as exc:  # noqa: BLE001 - no assignment, no hand-off: the pod is deleted as before
            logger.warning(f"Could not write pod {pod_id}'s assignment ({exc}); not handing it over")
            return False
        return True

    async def _clear_assignment(self, pod_id: str) -> None:
        from prefect.variables import Variable

        with contextlib.suppress(Exception):
            await Variable.aunset(assignment_variable(pod_id))

    async def _serves_another_run(self, pod_id: str, flow_run_id: str | None) -> str | None:
        """The run a handed-over pod now serves, when that is not `flow_run_id`: a cancel of an earlier run of the
        pod must not delete it under its current run. None when the pod has no assignment (a pod per run), or it
        is this run's, or the assignment cannot be read (then the cancel deletes, as for any pod)."""
        from prefect.variables import Variable

        if not flow_run_id:
            return None
        try:
            value = await Variable.aget(assignment_variable(pod_id))
        except Exception:  # noqa: BLE001 - cannot tell: the cancel goes ahead
            return None
        current = value.get("flow_run_id") if isinstance(value, dict) else None
        return str(current) if current and str(current) != str(flow_run_id) else None

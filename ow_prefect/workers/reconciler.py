"""The `runpod` worker's reconciler: a room of its own, because Prefect's workers have no such concern.

A worker that dies mid-run leaves its pod billing. At start, then every `OW_RUNPOD_RECONCILE_SECONDS`, the
reconciler lists the pods named `ow-<flow run id>` that carry this work pool's marker in their env (RunPod v2 has
no labels), skips the ones a worker of this process watches, and deletes those whose run is over, gone,
rescheduled, long cancelling or past its `max_runtime` or `max_cost` (other env markers: its deadline, and the cap
its price × age is held to), setting the run's state where that says more (TimedOut, CostCapped, Cancelled) and
writing the pod's cost row. A pod that runs the warm agent (workers/handoff.py) is judged by its assignment
Variable instead: the run it names now (not the one in its env), that assignment's deadline and cap, and a pod
whose run is over but that is warm until `warm_until` is left alone until then. Several workers on one pool may
reconcile it at once: a delete that answers 404 was another worker's, and only the worker that deleted the pod
accounts for it.

Without RunPod credentials it can do nothing, and says so once in the worker's log.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
from prefect.states import Cancelled, Failed

from ow_prefect.errors import ConfigurationError
from ow_prefect.runpod.agent import KEEP_WARM_ENV, assignment_variable
from ow_prefect.runpod.client import AsyncRunPodClient
from ow_prefect.runpod.credentials import RunPodCredentials
from ow_prefect.runpod.errors import RunPodAuthError
from ow_prefect.runpod.models import Pod
from ow_prefect.settings import get_settings
from ow_prefect.workers.costs import MAX_COST_MARKER, PodRecord, _parse_time

POD_PREFIX = "ow-"
POOL_MARKER = "OW_WORK_POOL_ID"  # env markers: how the reconciler knows a pod is this pool's (v2 has no labels)
DEADLINE_MARKER = "OW_POD_DEADLINE"  # epoch seconds after which the pod is past its max_runtime
STALE_CANCELLING_SECONDS = 60.0
_GONE = object()  # what the worker's `_state` returns for a flow run that no longer exists
_UNKNOWN = object()  # a warm pod's assignment could not be read


class PodReconciler:
    """The reconciler's passes, a mixin of `RunPodWorker` (whose `_state`, `_force_state`, `_delete`, `_account`,
    `_remember`, `_warn_once`, `_watched` and `_credentials` it uses)."""

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
        run is over, deleted, rescheduled, long cancelling or past `max_runtime` or `max_cost`. Returns the deleted
        pod ids."""
        if self._work_pool is None:
            return []
        if not self._credentials:
            try:
                self._remember(await self._pool_credentials())
            except ConfigurationError as exc:  # said once at start: every run of this pool will fail the same way
                self._warn_once(
                    self._logger,
                    "no-credentials",
                    f"RunPod reconciler: work pool {self._work_pool.name!r} has no RunPod credentials, so orphan pods "
                    f"of this pool are not cleaned up (and its runs fail): {exc}",
                )
            except Exception as exc:  # e.g. the pool names a block that was deleted; said once, tried every pass
                self._warn_once(
                    self._logger,
                    "bad-credentials",
                    f"RunPod reconciler: cannot load work pool {self._work_pool.name!r}'s RunPod credentials "
                    f"({type(exc).__name__}: {exc}), so orphan pods of this pool are not cleaned up: check that the "
                    "pool's `credentials` variable names an existing RunPod Credentials block (`ow setup`), or set "
                    "RUNPOD_API_KEY in the worker's environment",
                )
        deleted = []
        for credentials in list(self._credentials.values()):
            async with credentials.get_client() as runpod:
                for pod in await runpod.find_pods(POD_PREFIX):
                    if pod.env.get(POOL_MARKER) != str(self._work_pool.id) or pod.id in self._watched:
                        continue
                    assignment = await _assignment(pod)
                    if assignment is _UNKNOWN:  # its current run is not known now: decide next time
                        continue
                    verdict = await self._orphan_verdict(pod, assignment)
                    if verdict is None:
                        continue
                    reason, state = verdict
                    flow_run_id = assignment["flow_run_id"] if assignment else _flow_run_id(pod)
                    self._logger.info(f"Reconciler: deleting pod {pod.id} ({reason})")
                    if state is not None and flow_run_id:
                        await self._force_state(flow_run_id, state, self._logger)
                    if await self._delete(runpod, pod.id, self._logger) == "deleted":  # else another worker did
                        deleted.append(pod.id)
                        if flow_run_id:
                            record = PodRecord.found(pod, flow_run_id, pod.name)
                            if assignment and isinstance(assignment.get("assigned_at"), int | float):
                                record.created_at = float(assignment["assigned_at"])
                            await self._account(record, f"reconciler: {reason}", self._logger)
                        if assignment is not None:
                            await self._clear_assignment(pod.id)
        return deleted

    async def _orphan_verdict(self, pod: Pod, assignment: dict[str, Any] | None = None) -> tuple[str, Any] | None:
        flow_run_id = assignment["flow_run_id"] if assignment else _flow_run_id(pod)
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
            warm_until = _float(str((assignment or {}).get("warm_until")))
            if warm_until is not None and time.time() < warm_until:
                return None  # warm: waiting for its next run (workers/handoff.py)
            return f"its flow run is {state.name}", None
        if state.is_scheduled():
            return "its flow run was rescheduled", None
        assigned = assignment if assignment and "assigned_at" in assignment else None  # handed over: its own caps
        deadline = _float(str(assigned.get("deadline")) if assigned else pod.env.get(DEADLINE_MARKER))
        if deadline is not None and time.time() > deadline:
            message = f"The run exceeded its max_runtime; the reconciler deleted pod {pod.id}."
            return "past its max_runtime", Failed(name="TimedOut", message=message)
        max_cost = _float(str(assigned.get("max_cost")) if assigned else pod.env.get(MAX_COST_MARKER))
        since = _float(str(assigned.get("assigned_at"))) if assigned else _parse_time(pod.created_at)
        spent = (pod.cost or 0.0) * max(0.0, time.time() - (since or time.time())) / 3600
        if max_cost is not None and spent >= max_cost:
            message = f"The run reached its max_cost (${max_cost:g}); the reconciler deleted pod {pod.id}."
            return "past its max_cost", Failed(name="CostCapped", message=message)
        if state.is_cancelling() and state.timestamp and _age(state.timestamp) > STALE_CANCELLING_SECONDS:
            return "its flow run has been cancelling for a minute", Cancelled(message="Cancelled; pod deleted.")
        return None

    async def _live_pod_costs(self, runpod: AsyncRunPodClient) -> list[tuple[float, float]]:
        """(price per hour, creation time) of this pool's pods that run now: the daily budget's running part."""
        return [
            (pod.cost or 0.0, self._assigned_at.get(pod.id) or _parse_time(pod.created_at) or time.time())
            for pod in await runpod.find_pods(POD_PREFIX)
            if self._work_pool is not None and pod.env.get(POOL_MARKER) == str(self._work_pool.id) and not pod.ended
        ]

    async def _pool_credentials(self) -> RunPodCredentials:
        """The credentials the work pool's defaults resolve to (block or the worker's RUNPOD_API_KEY)."""
        configuration = await self.job_configuration.from_template_and_values(
            self._work_pool.base_job_template, {}, client=self.client
        )
        return configuration.runpod_credentials()


async def _assignment(pod: Pod) -> Any:
    """The assignment of a pod that runs the warm agent (workers/handoff.py), or None."""
    if pod.env.get(KEEP_WARM_ENV, "0") in ("", "0"):
        return None
    from prefect.variables import Variable

    try:
        value = await Variable.aget(assignment_variable(pod.id), default=None)
    except Exception:  # noqa: BLE001 - unreadable now: the caller decides next time
        return _UNKNOWN
    if not isinstance(value, dict):
        return None
    try:
        return {**value, "flow_run_id": UUID(str(value.get("flow_run_id")))}
    except ValueError:
        return None


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


def _age(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (datetime.now(UTC) - moment).total_seconds()

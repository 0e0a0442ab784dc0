"""Watching a run and its pod together until one of them ends: a room of the `runpod` worker (workers/runpod.py).

`PodWatch` (a mixin of `RunPodWorker`, whose `client`, `_poll`, `_crash`, `_before_start`, `_flow_started`, `_stop`,
`_cost_capped` and `_emit` it uses) reads the run from the Prefect API and the pod from RunPod, every poll, and
returns the `Outcome` that ends the pod (workers/attempts.py): the run final, cancelling, rescheduled (or already on
its next pod: `_MovedOn`), suspended, gone; `max_runtime` or `max_cost` reached; the flow not started within
`startup_timeout`; the pod in ERROR, stopped by RunPod (a preemption: the run is given time to reschedule itself),
deleted outside the worker, or its container exiting under the run. The module docstring of workers/runpod.py
lists what each outcome does to the run.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Failed

from ow_prefect.runpod.errors import RunPodError, RunPodNotFound
from ow_prefect.workers.attempts import INFRA_PREFIX, ContainerTracker, Outcome
from ow_prefect.workers.reconciler import _GONE

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.schemas.objects import FlowRun

    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.runpod.models import Pod
    from ow_prefect.workers.costs import PodRecord
    from ow_prefect.workers.placement import Placement
    from ow_prefect.workers.runpod import RunPodJobConfiguration

CANCEL_GRACE_SECONDS = 5.0  # lets the supervisor in the pod finish a cancellation it already saw
PREEMPT_GRACE_SECONDS = 60.0  # lets a pod that RunPod stopped reschedule its run through its SIGTERM handler


class PodWatch:
    """A run and its pod, watched together (see the module docstring)."""

    async def _watch(
        self,
        runpod: AsyncRunPodClient,
        flow_run: FlowRun,
        configuration: RunPodJobConfiguration,
        record: PodRecord,
        deadline: float,
        logger: Any,
        placement: Placement,
        startup_timeout: float | None = None,
    ) -> Outcome:
        pod = record.pod
        created = time.monotonic()
        startup_timeout = configuration.startup_timeout if startup_timeout is None else startup_timeout
        flow_started = False
        container: ContainerTracker = ContainerTracker()
        next_pod_check = 0.0
        moved = _MovedOn(pod.id)
        while True:
            current = await self._read_run(flow_run.id, logger)
            state = _state_of(current)
            if state is _GONE:
                return Outcome("its flow run was deleted")
            if (elsewhere := moved.to(current)) is not None:  # rescheduled and already on its next pod
                return Outcome(f"the flow run was rescheduled onto pod {elsewhere}")
            if state is not None:
                if state.is_crashed():  # e.g. the pull step failed in the pod: Prefect says only "exited with 1"
                    return await self._crash(runpod, flow_run, pod, state.message or "the flow run crashed", logger)
                if state.is_final():
                    return Outcome(f"the flow run is {state.name}", reusable=state.is_completed())
                if state.is_cancelling():
                    return await self._cancel(flow_run, flow_started, logger)
                if state.is_scheduled():
                    return Outcome("the flow run was rescheduled")
                if state.is_paused() and state.name == "Suspended":
                    return Outcome("the flow run was suspended")
                if not flow_started and state.type not in (StateType.PENDING, StateType.SCHEDULED):
                    flow_started = record.flow_started = True
                    await self._flow_started(runpod, record, placement, logger)
            if time.time() >= deadline:
                message = f"The run exceeded max_runtime ({configuration.max_runtime} s); pod {pod.id} deleted."
                timed_out = Failed(name="TimedOut", message=message)
                state = await self._stop(flow_run, "max_runtime passed", timed_out, flow_started, logger)
                return Outcome("max_runtime passed", before_delete=state, status_code=1)
            if (capped := self._cost_capped(configuration.max_cost, record)) is not None:
                state = await self._stop(flow_run, "max_cost reached", capped, flow_started, logger)
                return Outcome("max_cost reached", before_delete=state, status_code=1)
            if not flow_started and time.monotonic() - created >= startup_timeout:
                reason = f"the flow run did not start within startup_timeout ({startup_timeout:g} s)"
                return await self._before_start(runpod, flow_run, record, reason, logger)
            if time.monotonic() >= next_pod_check:
                next_pod_check = time.monotonic() + self._poll
                try:
                    pod = await runpod.get_pod(pod.id)
                except RunPodNotFound:
                    if record.handed_from and not flow_started:  # a warm pod lost before it took the run
                        return Outcome("the pod was deleted outside the worker")
                    reason = "the pod was deleted outside the worker"
                    return await self._pod_gone(runpod, flow_run, pod, reason, logger, moved)
                except RunPodError as exc:
                    self._warn_once(logger, f"get-{pod.id}", f"Cannot read pod {pod.id} now ({exc}); still watching")
                else:
                    record.pod = pod
                    if pod.status == "ERROR" and not flow_started:
                        return await self._before_start(runpod, flow_run, record, "the pod is in ERROR", logger)
                    if pod.status == "ERROR":
                        return await self._crash(runpod, flow_run, pod, "the pod is in ERROR", logger)
                    if pod.status in ("EXITED", "TERMINATED") and record.handed_from and not flow_started:
                        return Outcome(f"RunPod stopped the pod ({pod.status})")
                    if pod.status in ("EXITED", "TERMINATED"):
                        return await self._pod_gone(
                            runpod, flow_run, pod, f"RunPod stopped the pod ({pod.status})", logger, moved
                        )
                    if container.observe(pod) == "up" and not record.handed_from:
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
        self,
        runpod: AsyncRunPodClient,
        flow_run: FlowRun,
        pod: Pod,
        reason: str,
        logger: Any,
        moved: _MovedOn | None = None,
    ) -> Outcome:
        """The pod ended under the run (preemption, a manual delete): a preempted flow reschedules itself on
        SIGTERM, so give it time to (a worker may have given it its next pod before this watch saw it Scheduled);
        anything else is a crash."""
        end = time.monotonic() + PREEMPT_GRACE_SECONDS
        moved = moved or _MovedOn(pod.id)
        while time.monotonic() < end:
            current = await self._read_run(flow_run.id, logger)
            state = _state_of(current)
            if state is _GONE:
                return Outcome("its flow run was deleted")
            if (elsewhere := moved.to(current)) is not None:
                logger.info(f"{reason}; the flow run was rescheduled and runs on pod {elsewhere}")
                return Outcome("the flow run was rescheduled after the pod stopped")
            if state is not None and (state.is_final() or state.is_scheduled() or state.is_cancelling()):
                if state.is_scheduled():
                    logger.info(f"{reason}; the flow run was rescheduled and gets a new pod")
                    return Outcome("the flow run was rescheduled after the pod stopped")
                if state.is_cancelling():
                    return Outcome("the flow run was cancelled", before_delete=Cancelled(message="Cancelled."))
                return Outcome(f"the flow run is {state.name}")
            await anyio.sleep(min(self._poll, 1.0))
        return await self._crash(runpod, flow_run, pod, reason, logger)

    # ---- the run as the Prefect API has it now ---------------------------------------------------------

    async def _state(self, flow_run_id: UUID, logger: Any = None) -> Any:
        """The run's current state; `_GONE` when the run was deleted; None when the API did not answer."""
        current = await self._read_run(flow_run_id, logger)
        return _state_of(current)

    async def _read_run(self, flow_run_id: UUID, logger: Any = None) -> Any:
        """The run as the server has it now; `_GONE` when it was deleted; None when the API did not answer."""
        try:
            return await self.client.read_flow_run(flow_run_id)
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


def _state_of(current: Any) -> Any:
    """A read run's state; `_GONE` and None (deleted, no answer) stay as they are."""
    return current.state if current is not None and current is not _GONE else current


class _MovedOn:
    """Whether a watched pod's run has moved on to another pod: a preempted run reschedules itself and a worker
    may claim it and create its next pod within one poll of this watch, which then never sees it Scheduled. The
    run's infrastructure id names its newest pod; it names this pod first (once its create is recorded), so
    another pod named after that is the run's next one."""

    def __init__(self, pod_id: str) -> None:
        self.own, self.seen_own = f"{INFRA_PREFIX}{pod_id}", False

    def to(self, flow_run: Any) -> str | None:
        """The pod the run moved on to, or None."""
        pid = getattr(flow_run, "infrastructure_pid", None)
        if not isinstance(pid, str):
            return None
        if pid == self.own:
            self.seen_own = True
            return None
        return pid.removeprefix(INFRA_PREFIX) if self.seen_own and pid.startswith(INFRA_PREFIX) else None

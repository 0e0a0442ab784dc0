"""One run's pods, attempt after attempt: a room of the `runpod` worker (workers/runpod.py), next to the placement
it drives (workers/placement.py).

`PodAttempts` (a mixin of `RunPodWorker`) holds what the worker does around each pod of a run: the run's
`Placement` (what its next pod must avoid), the run's infrastructure id for each new pod, the GPU health report
once the flow started (an `ow.pod.healthy` or `ow.pod.unhealthy` event; the cooldown cleared) or when the pod died
before (its check passed: the run crashes as always; else the pod is given up and the run tried elsewhere), and
the message of a run out of attempts; and how a pod that fails under its run ends it: Crashed with the first error
and the last lines of its log. `Outcome` is how a pod's watch ended; `ContainerTracker` counts a pod's container
starts and exits from successive reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from prefect.states import Crashed

from ow_prefect.runpod.errors import RunPodError
from ow_prefect.runpod.health import Report, parse_report
from ow_prefect.workers.cooldown import CooldownStore
from ow_prefect.workers.placement import HEALTH_LOG_LINES, VERIFIED, Placement

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from ow_prefect.runpod.client import AsyncRunPodClient
    from ow_prefect.runpod.models import Pod
    from ow_prefect.workers.costs import PodRecord
    from ow_prefect.workers.runpod import RunPodJobConfiguration

INFRA_PREFIX = "runpod::"
LOG_LINES_IN_MESSAGE = 15
LOG_LINES_LOGGED = 40
LOG_LINES_SEARCHED = 400  # for the first exception: a crash loop repeats it, Prefect's reactions follow it
ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception|Exit)\b.*: ")  # a Python exception's last line


@dataclass
class Outcome:
    """How a watch ended: the state to set before and after deleting the pod, and the worker's exit code."""

    reason: str
    before_delete: Any = None  # a state proposed (forced) before the delete: final states block a reschedule
    after_delete: Any = None  # a state forced once the pod is gone (Crashed does not block a reschedule)
    status_code: int = 0
    elsewhere: bool = False  # the pod failed before its flow started, not through its command: try another one
    reusable: bool = False  # the run completed on a working pod: it may go on to the next run (workers/handoff.py)
    log_tail: str = ""


class PodAttempts:
    """The pods of one run, their GPU health check and their crash, a mixin of `RunPodWorker` (whose `client` and
    `_emit` it uses)."""

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

    # ---- a pod that failed under its run ---------------------------------------------------------------

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

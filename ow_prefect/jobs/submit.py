"""Submission semantics shared by the sync and async clients (no I/O here).

Look up the flow run tagged ``ow-job:{id}``: pending/running/completed -> that job; failed, crashed or
cancelled -> the same run back to Scheduled (``AwaitingRetry``); none -> a new run with idempotency key
``{deployment}:{id}``, so concurrent identical submissions meet in the server's unique index.
"""

from __future__ import annotations

from typing import Any, Literal

from ow_prefect.errors import StorageError
from ow_prefect.hashing import is_job_id
from ow_prefect.jobs.base import Job, JobStatus, get_job_type

JOB_TAG = "ow-job"
STATE_STATUS: dict[str, JobStatus] = {
    "SCHEDULED": "pending",
    "PENDING": "pending",
    "PAUSED": "pending",
    "RUNNING": "in_progress",
    "CANCELLING": "in_progress",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "CRASHED": "failed",
    "CANCELLED": "canceled",
}
STATUS_STATES: dict[JobStatus, list[str]] = {}
for _state, _status in STATE_STATUS.items():
    STATUS_STATES.setdefault(_status, []).append(_state)

Action = Literal["existing", "retry", "create"]


def job_tag(job_id: str) -> str:
    return f"{JOB_TAG}:{job_id}"


def type_tag(type_name: str) -> str:
    return f"ow-type:{type_name}"


def tags_for(job_cls: type[Job], job_id: str) -> list[str]:
    return [JOB_TAG, job_tag(job_id), type_tag(job_cls.name)]


def idempotency_key(deployment: str, job_id: str) -> str:
    # Prefect's idempotency keys are unique per flow, not per deployment: the deployment keeps them apart.
    return f"{deployment}:{job_id}"


def status_of(flow_run: Any) -> JobStatus:
    state = flow_run.state
    return STATE_STATUS.get(state.type.value, "pending") if state else "pending"


def plan(flow_run: Any | None) -> Action:
    """What to do with the newest run of a job being submitted again."""
    if flow_run is None:
        return "create"
    if status_of(flow_run) in ("failed", "canceled"):
        return "retry" if flow_run.deployment_id else "create"
    return "existing"


def tag_value(tags: list[str], prefix: str) -> str | None:
    return next((t[len(prefix) + 1 :] for t in tags if t.startswith(prefix + ":")), None)


def job_from_run(flow_run: Any, outputs: dict[str, Any] | None, client: Any) -> Job:
    type_name = tag_value(flow_run.tags, "ow-type") or "custom"
    try:
        cls = get_job_type(type_name)
    except AttributeError:
        cls = Job
    state = flow_run.state
    status = status_of(flow_run)
    params = {k: v for k, v in (flow_run.parameters or {}).items() if k != "ow_job"}
    return cls(
        id=tag_value(flow_run.tags, JOB_TAG) or str(flow_run.id),
        type=type_name,
        status=status,
        params=params,
        flow_run_id=str(flow_run.id),
        created_at=flow_run.created.timestamp() if flow_run.created else None,
        updated_at=flow_run.updated.timestamp() if flow_run.updated else None,
        outputs=outputs,
        error=state.message if state and status in ("failed", "canceled") else None,
        run_count=flow_run.run_count,
        state_name=state.name if state else None,
        client=client,
    )


def outputs_key(job_id: str) -> str:
    """Where a job's outputs are stored. Job ids also come from run tags, which anyone with access to the
    Prefect API can set, so an id that does not have the shape of one is refused before it becomes a key."""
    if not is_job_id(job_id):
        raise StorageError(f"{job_id!r} is not a job id (like 'ftjob-0123456789ab'); nothing was read")
    return f"outputs/{job_id}.json"

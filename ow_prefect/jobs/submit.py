"""Submission semantics shared by the sync and async clients (no I/O here).

Look up the flow run tagged ``ow-job:{id}``: pending/running/completed -> that job; failed, crashed or
cancelled -> the same run back to Scheduled (``AwaitingRetry``); none -> a new run with idempotency key
``{deployment}:{id}``, so concurrent identical submissions meet in the server's unique index.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

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


@dataclass
class SubmissionOptions:
    """How to run a job rather than what it computes (not in the job id): OpenWeights' ``create`` keywords."""

    job_variables: dict[str, Any] = field(default_factory=dict)
    rerun: frozenset[str] = frozenset({"failed", "canceled"})  # statuses a resubmission runs again


def submission_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], SubmissionOptions]:
    """Take OpenWeights' submission keywords out of `kwargs`: ``allowed_hardware`` and ``cloud_type`` (the RunPod
    worker's ``gpu_types``/``gpu_count``/``cloud``), ``worker_max_uptime`` (hours: ``max_runtime``),
    ``create_on_failed_status`` / ``create_on_canceled_status`` (False: return such a job as it is), and
    ``requires_vram_gb="guess"`` (the estimate). ``base_image`` / ``docker_image`` name OpenWeights' images, which
    cannot run ow_prefect's flows: they are ignored with a warning."""
    from ow_prefect.jobs.hardware import cloud_variable, hardware_variables

    kwargs, options = dict(kwargs), SubmissionOptions()
    if kwargs.get("requires_vram_gb") == "guess":
        kwargs["requires_vram_gb"] = None
    hardware = kwargs.pop("allowed_hardware", None)
    if hardware is not None:
        options.job_variables |= hardware_variables(hardware, kwargs.get("requires_vram_gb"))
    if (cloud := kwargs.pop("cloud_type", None)) is not None:
        options.job_variables |= cloud_variable(cloud)
    if (hours := kwargs.pop("worker_max_uptime", None)) is not None:
        options.job_variables["max_runtime"] = max(1, round(float(hours) * 3600))
    for key in ("base_image", "docker_image"):
        if (image := kwargs.pop(key, None)) is not None:
            warnings.warn(
                f"{key}={image!r} ignored: built-in jobs run ow_prefect's own images (OW_TRAIN_IMAGE, "
                "OW_SERVE_IMAGE; `image` in the deployment's job variables); a CustomJob type sets `base_image`",
                UserWarning,
                stacklevel=4,
            )
    rerun = set(options.rerun)
    for status, key in (("failed", "create_on_failed_status"), ("canceled", "create_on_canceled_status")):
        if not kwargs.pop(key, True):
            rerun.discard(status)
    options.rerun = frozenset(rerun)
    return kwargs, options


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
    parameters = flow_run.parameters or {}
    params = {k: v for k, v in parameters.items() if k != "ow_job"}
    job_id = tag_value(flow_run.tags, JOB_TAG) or str(flow_run.id)
    return cls(
        id=job_id,
        type=type_name,
        status=status,
        params=cls.shown_params(params, job_id),
        flow_run_id=str(flow_run.id),
        created_at=flow_run.created.timestamp() if flow_run.created else None,
        updated_at=flow_run.updated.timestamp() if flow_run.updated else None,
        outputs=outputs,
        error=state.message if state and status in ("failed", "canceled") else None,
        run_count=flow_run.run_count,
        state_name=state.name if state else None,
        run_variables=flow_run.job_variables,
        docker_image=(parameters.get("ow_job") or {}).get("image"),
        worker_id=flow_run.infrastructure_pid,
        client=client,
    )


def outputs_key(job_id: str) -> str:
    return f"outputs/{job_id}.json"

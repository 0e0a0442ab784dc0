"""Submission semantics shared by the sync and async clients (no I/O here).

Look up the flow run tagged ``ow-job:{id}``: pending/running/completed -> that job; failed, crashed or
cancelled -> the same run back to Scheduled (``AwaitingRetry``); none -> a new run with idempotency key
``{deployment}:{id}``, so concurrent identical submissions meet in the server's unique index.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ow_prefect.errors import ParameterError, StorageError
from ow_prefect.hashing import is_job_id
from ow_prefect.jobs.base import Job, JobStatus
from ow_prefect.jobs.registry import get_job_type, job_types

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


ACTIVE_STATES = ("PENDING", "RUNNING", "CANCELLING")  # a run in one of these may hold its job's lock
FLOW_ONLY_PARAMETERS = ("ow_job", "force_rerun")  # flow parameters that are not the job's (not in its id)


def job_tag(job_id: str) -> str:
    return f"{JOB_TAG}:{job_id}"


def cached_tag(job_id: str) -> str:
    """The tag of a run that found its job completed and ran nothing (it is not a run of the job)."""
    return f"ow-cached:{job_id}"


def lock_name(job_id: str) -> str:
    """The global concurrency limit that a run of the job holds while it checks for and does the work."""
    return f"ow-job-lock:{job_id}"


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
    worker's ``gpu_types``/``gpu_count``/``cloud``), ``worker_max_uptime`` (hours: ``max_runtime``), ``max_cost``
    (dollars: the worker's cost cap), ``create_on_failed_status`` / ``create_on_canceled_status`` (False: return
    such a job as it is), and
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
    if (cap := kwargs.pop("max_cost", None)) is not None:
        options.job_variables["max_cost"] = float(cap)
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


def accepting(parameters: dict[str, Any], entrypoint: str | None) -> tuple[list[type[Job]], Any]:
    """The job types whose flow is `entrypoint`, and the first of them that accepts the run's `parameters` with its
    validated parameters (None when none does): how a run started without the SDK is identified, as its flow would.
    Validation may ask Prefect or storage (``model="ftjob:latest"``)."""
    candidates = [cls for cls in job_types().values() if cls.entrypoint == entrypoint]
    params = {k: v for k, v in parameters.items() if k not in FLOW_ONLY_PARAMETERS}
    for cls in candidates:
        try:
            return candidates, (cls, cls.validate_params(**params))
        except ParameterError:  # invalid for this type (or for all of them); an outage is not hidden
            continue
    return candidates, None


def tag_value(tags: list[str], prefix: str) -> str | None:
    return next((t[len(prefix) + 1 :] for t in tags if t.startswith(prefix + ":")), None)


def job_from_run(
    flow_run: Any,
    outputs: dict[str, Any] | None,
    client: Any,
    *,
    job_id: str | None = None,
    type_name: str | None = None,
    run_count: int | None = None,
) -> Job:
    """The job whose newest run is `flow_run`; `run_count` counts the attempts of all its runs (default: this
    run's). A run that never tagged itself (it ended before its flow started) gets its id and type passed in."""
    type_name = type_name or tag_value(flow_run.tags, "ow-type") or "custom"
    try:
        cls = get_job_type(type_name)
    except AttributeError:
        cls = Job
    state = flow_run.state
    status = status_of(flow_run)
    parameters = flow_run.parameters or {}
    params = {k: v for k, v in parameters.items() if k not in FLOW_ONLY_PARAMETERS}
    job_id = job_id or tag_value(flow_run.tags, JOB_TAG) or str(flow_run.id)
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
        run_count=flow_run.run_count if run_count is None else run_count,
        state_name=state.name if state else None,
        run_variables=flow_run.job_variables,
        docker_image=(parameters.get("ow_job") or {}).get("image"),
        worker_id=flow_run.infrastructure_pid,
        client=client,
    )


def newest_per_job(runs: Iterable[tuple[str, str, Any]]) -> dict[str, tuple[str, Any]]:
    """(job id, type name, run), newest run first -> job id: (type name, its newest run), newest job first."""
    newest: dict[str, tuple[str, Any]] = {}
    for job_id, type_name, run in runs:
        newest.setdefault(job_id, (type_name, run))
    return newest


def tagged_by_ow(flow_run: Any) -> bool:
    """Tagged by the SDK or by its flow as a run of a job, or found its job done (then it ran nothing)."""
    return JOB_TAG in flow_run.tags or any(t.startswith("ow-cached:") for t in flow_run.tags)


def checked_job_id(job_id: str) -> str:
    """Job ids also come from run tags, which anyone with access to the Prefect API can set: an id that does not
    have the shape of one is refused before it becomes a storage key."""
    if not is_job_id(job_id):
        raise StorageError(f"{job_id!r} is not a job id (like 'ftjob-0123456789ab'); nothing was read")
    return job_id


def outputs_key(job_id: str) -> str:
    """The job's latest outputs (what `job.outputs` shows)."""
    return f"outputs/{checked_job_id(job_id)}.json"


def history_key(job_id: str) -> str:
    """Every completed run of the job, oldest first: flow run id, run count, completion time, record key."""
    return f"outputs/{checked_job_id(job_id)}/history.json"


def run_outputs_key(job_id: str, flow_run_id: str, run_count: int) -> str:
    """The outputs of one completed run of the job (written once, never replaced)."""
    return f"outputs/{checked_job_id(job_id)}/runs/{flow_run_id}-{int(run_count)}.json"

"""What the resources ask Prefect about flow runs: the filters, and reading the runs page by page (shared by
`ow.jobs` and `ow.runs`; logs and events are in `_logs.py`)."""

from __future__ import annotations

from typing import Any

from ow_prefect.jobs.base import JobStatus
from ow_prefect.jobs.registry import job_types
from ow_prefect.jobs.submit import STATE_STATUS, STATUS_STATES, job_tag

RUNS_PAGE = 200  # the server's largest page of flow runs


def run_filter(tags: list[str], statuses: list[JobStatus] | None = None):
    """Flow runs with all of `tags`, in one of `statuses` (any when None)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )

    state = None
    if statuses:
        types = [s for status in statuses for s in STATUS_STATES[status]]
        state = FlowRunFilterState(type=FlowRunFilterStateType(any_=types))
    return FlowRunFilter(tags=FlowRunFilterTags(all_=tags), state=state)


def any_job_filter(job_ids: list[str]):
    """Flow runs of any of these jobs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    return FlowRunFilter(tags=FlowRunFilterTags(any_=[job_tag(job_id) for job_id in job_ids]))


def untagged_filters() -> dict[str, Any]:
    """Not-completed deployment runs of the flows of the registered job types (a completed run of them always
    started its flow, which tags it)."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    flows = sorted({cls.deployment.partition("/")[0] for cls in job_types().values()})
    states = [state for state in STATE_STATUS if state != "COMPLETED"]
    return {
        "flow_filter": FlowFilter(name=FlowFilterName(any_=flows)),
        "flow_run_filter": FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(is_null_=False),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
        ),
    }


def deployment_filter(ids: set[Any]):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=list(ids)))


def newest_first():
    from prefect.client.schemas.sorting import FlowRunSort

    return FlowRunSort.EXPECTED_START_TIME_DESC


async def read_runs(client: Any, flow_run_filter: Any, limit: int, offset: int = 0, **filters: Any) -> list[Any]:
    """The newest `limit` flow runs matching the filters (after the first `offset`), page by page."""
    runs: list[Any] = []
    while len(runs) < limit:
        size = min(RUNS_PAGE, limit - len(runs))
        page = await client.read_flow_runs(
            flow_run_filter=flow_run_filter, sort=newest_first(), limit=size, offset=offset + len(runs), **filters
        )
        runs += page
        if len(page) < size:
            break
    return runs


def as_flow_run_id(value: str) -> Any:
    """`value` as a flow run id (a UUID), or None when it is not one."""
    from uuid import UUID

    try:
        return UUID(value)
    except ValueError:
        return None


def statuses_of(status: JobStatus | list[JobStatus] | None) -> list[JobStatus] | None:
    """A status argument (one, several or None) as a list, each checked."""
    if status is None:
        return None
    statuses = [status] if isinstance(status, str) else list(status)
    unknown = [s for s in statuses if s not in STATUS_STATES]
    if unknown:
        raise ValueError(f"unknown status {unknown}; use one of {sorted(STATUS_STATES)}")
    return statuses


async def read_flow_run(client: Any, run_id: Any) -> Any | None:
    """The flow run with this id, or None when the server has none (an outage still raises)."""
    from prefect.exceptions import ObjectNotFound

    try:
        return await client.read_flow_run(run_id)
    except ObjectNotFound:
        return None

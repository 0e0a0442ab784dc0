"""`ow.jobs` and `ow.<job type>`: submit, look up, wait for, cancel and restart jobs (sync and async twins).

Both twins share `ow_prefect.jobs.submit` (what to do) and differ only in how they talk to Prefect: the sync
one through Prefect's sync client, the async one through its async client. In embedded mode (no Prefect API
URL) a job's flow is called directly in this process, against Prefect's ephemeral API.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ow_prefect.client._logs import (
    EVENTS_PAGE,
    MAX_EVENT_PAGES,
    event_filter,
    format_events,
    format_logs,
    log_filter,
)
from ow_prefect.errors import ConfigurationError, NotFoundError, OWError, StorageError
from ow_prefect.jobs.base import TERMINAL_STATUSES, Job, JobStatus, get_job_type, project_root, raise_for_failure
from ow_prefect.jobs.submit import (
    JOB_TAG,
    STATUS_STATES,
    idempotency_key,
    job_from_run,
    job_tag,
    outputs_key,
    plan,
    status_of,
    tag_value,
    tags_for,
    type_tag,
)
from ow_prefect.settings import get_settings
from ow_prefect.storage import check_relative_path

if TYPE_CHECKING:
    from ow_prefect.client._client import BaseOpenWeights


class JobTimeoutError(OWError, TimeoutError):
    """`wait()` ran past its timeout; the job goes on."""


def _run_filter(tags: list[str], statuses: list[JobStatus] | None = None):
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


def _newest_first():
    from prefect.client.schemas.sorting import FlowRunSort

    return FlowRunSort.EXPECTED_START_TIME_DESC


def _statuses(status: JobStatus | list[JobStatus] | None) -> list[JobStatus] | None:
    if status is None:
        return None
    statuses = [status] if isinstance(status, str) else list(status)
    unknown = [s for s in statuses if s not in STATUS_STATES]
    if unknown:
        raise ValueError(f"unknown status {unknown}; use one of {sorted(STATUS_STATES)}")
    return statuses


UNCLAIMED_STATES = ("SCHEDULED", "PAUSED")  # no worker holds the run: nothing runs that would need stopping


def _cancel_state(run: Any):
    from prefect.states import Cancelled, Cancelling

    # A run no worker has claimed is cancelled outright. A PENDING one is not: its process may be starting,
    # and Prefect lets a Cancelled run move on to Running. Like a running one it goes to CANCELLING, which
    # what runs it (the flow-run supervisor, the RunPod worker) watches for.
    if run.state and run.state.type.value in UNCLAIMED_STATES:
        return Cancelled(message="canceled through ow_prefect")
    return Cancelling()


def _retry_state():
    from prefect.states import Scheduled

    return Scheduled(name="AwaitingRetry", message="resubmitted through ow_prefect")


def _missing_deployment(name: str, exc: Exception) -> ConfigurationError:
    return ConfigurationError(
        f"deployment '{name}' does not exist on this Prefect server ({exc}). Register the built-in deployments "
        "with `prefect --no-prompt deploy --all` in the repository, or `python -m deployments.register --pool POOL`."
    )


def _embedded_flow(job_cls: type[Job]):
    """Load a job type's flow by its entrypoint, as a worker would (ow_prefect never imports flows/)."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = job_cls.entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{project_root() / path}:{name}")


def _call_flow(client: BaseOpenWeights, job_cls: type[Job], parameters: dict[str, Any], tags: list[str]) -> None:
    from prefect import tags as prefect_tags

    with client.prefect_settings(), prefect_tags(*tags):
        _embedded_flow(job_cls)(**parameters, return_state=True)


@dataclass
class Submission:
    job_cls: type[Job]
    job_id: str
    validated: Any
    parameters: dict[str, Any]
    deployment: str

    @property
    def tags(self) -> list[str]:
        return tags_for(self.job_cls, self.job_id)

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.deployment, self.job_id)


class _JobsBase:
    def __init__(self, client: BaseOpenWeights):
        self._client = client
        self._deployment_ids: dict[str, Any] = {}

    def _prepare(self, job_cls: type[Job], kwargs: dict[str, Any]) -> Submission:
        with self._client.prefect_settings():  # validation may ask Prefect (model="ftjob:latest")
            kwargs = job_cls.prepare_params(dict(kwargs), self._client.storage)
            validated = job_cls.validate_params(**kwargs)
        flow_parameters = job_cls.flow_parameters(validated)
        image, code = job_cls.image(), job_cls.code_hash()
        job_id = job_cls.compute_id(flow_parameters, image=image, code=code)
        envelope = {"id": job_id, "type": job_cls.name, "code_hash": code, "image": image}
        deployment = job_cls.deployment_for(validated) + get_settings().deployment_suffix
        return Submission(job_cls, job_id, validated, {**flow_parameters, "ow_job": envelope}, deployment)

    def _outputs(self, run: Any) -> dict[str, Any] | None:
        job_id = tag_value(run.tags, JOB_TAG)
        if status_of(run) != "completed" or job_id is None:
            return None
        try:
            return self._client.storage.get_json(outputs_key(job_id))
        except NotFoundError:
            return None

    def _job(self, run: Any) -> Job:
        return job_from_run(run, self._outputs(run), self._client)

    def _download(self, job: Job, dest: str | os.PathLike[str]) -> Path:
        dest = Path(dest)
        files = job.outputs.get("files") or {}
        for relpath in files:  # the outputs are a stored record too: every path stays inside `dest`
            try:
                check_relative_path(relpath)
            except ValueError as exc:
                raise StorageError(f"job {job.id}: result file {exc}; nothing was written") from None
        dest.mkdir(parents=True, exist_ok=True)
        for relpath, file_id in files.items():
            self._client.storage.download(file_id, dest / relpath)
        return dest


class Jobs(_JobsBase):
    """Synchronous job operations."""

    def _prefect(self):
        return self._client.prefect_client()

    def _find_run(self, client, job_id: str):
        runs = client.read_flow_runs(flow_run_filter=_run_filter([job_tag(job_id)]), sort=_newest_first(), limit=1)
        return runs[0] if runs else None

    def _deployment_id(self, client, name: str):
        if name not in self._deployment_ids:
            try:
                self._deployment_ids[name] = client.read_deployment_by_name(name).id
            except Exception as exc:
                raise _missing_deployment(name, exc) from exc
        return self._deployment_ids[name]

    def submit(self, job_cls: type[Job], **kwargs: Any) -> Job:
        sub = self._prepare(job_cls, kwargs)
        with self._prefect() as client:
            run = self._find_run(client, sub.job_id)
            action = plan(run)
            if action == "existing":
                return self._job(run)
            if self._client.embedded:
                _call_flow(self._client, job_cls, sub.parameters, sub.tags)
            elif action == "retry":
                client.set_flow_run_state(run.id, _retry_state())
            else:
                return self._job(
                    client.create_flow_run_from_deployment(
                        self._deployment_id(client, sub.deployment),
                        parameters=sub.parameters,
                        tags=sub.tags,
                        idempotency_key=sub.idempotency_key,
                        job_variables=_job_variables(job_cls, sub),
                    )
                )
            return self._job(self._find_run(client, sub.job_id))

    def retrieve(self, job_id: str) -> Job:
        with self._prefect() as client:
            run = self._find_run(client, job_id)
        if run is None:
            raise NotFoundError(f"no job {job_id}")
        return self._job(run)

    def list(
        self, status: JobStatus | list[JobStatus] | None = None, type: str | None = None, limit: int = 100
    ) -> list[Job]:
        tags = [JOB_TAG] + ([type_tag(type)] if type else [])
        with self._prefect() as client:
            runs = client.read_flow_runs(
                flow_run_filter=_run_filter(tags, _statuses(status)), sort=_newest_first(), limit=limit
            )
        return [self._job(run) for run in runs]

    def cancel(self, job_id: str) -> Job:
        with self._prefect() as client:
            run = self._find_run(client, job_id)
            if run is None:
                raise NotFoundError(f"no job {job_id}")
            if status_of(run) not in TERMINAL_STATUSES:
                client.set_flow_run_state(run.id, _cancel_state(run), force=True)
        return self.retrieve(job_id)

    def restart(self, job_id: str) -> Job:
        """Run a finished job again (same flow run, run count + 1); embedded runs start a new flow run."""
        job = self.retrieve(job_id)
        if not job.done:
            raise OWError(f"job {job_id} is {job.status}; cancel it before restarting")
        with self._prefect() as client:
            run = client.read_flow_run(job.flow_run_id)
            if run.deployment_id is not None:
                client.set_flow_run_state(run.id, _retry_state(), force=True)
        if run.deployment_id is None:
            job_cls = get_job_type(job.type)
            _call_flow(self._client, job_cls, run.parameters, tags_for(job_cls, job_id))
        return self.retrieve(job_id)

    def wait(
        self, job_id: str, timeout: float | None = None, poll_interval: float = 2.0, raise_on_failure: bool = True
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.retrieve(job_id)
            if job.done:
                return raise_for_failure(job) if raise_on_failure else job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(f"job {job_id} still {job.status} after {timeout} s; it goes on running")
            time.sleep(poll_interval)

    def logs(self, job_id: str) -> str:
        job = self.retrieve(job_id)
        with self._prefect() as client:
            return format_logs(client.read_logs(log_filter=log_filter(job.flow_run_id)))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        job = self.retrieve(job_id)
        events = []
        with self._prefect() as client:
            page = client.read_events(filter=event_filter(job.flow_run_id), limit=EVENTS_PAGE)
            for _ in range(MAX_EVENT_PAGES):
                events += page.events
                if not page.next_page:
                    break
                page = client.read_events_page(str(page.next_page))
        return format_events(events)

    def download(self, job_id: str, dest: str | os.PathLike[str]) -> Path:
        """Download every result file of a completed job into `dest` (kept at its path under uploads/)."""
        return self._download(raise_for_failure(self.retrieve(job_id)), dest)


class AsyncJobs(_JobsBase):
    """Asynchronous job operations: the twin of `Jobs`, on Prefect's async client."""

    def _prefect(self):
        return self._client.async_prefect_client()

    async def _find_run(self, client, job_id: str):
        runs = await client.read_flow_runs(
            flow_run_filter=_run_filter([job_tag(job_id)]), sort=_newest_first(), limit=1
        )
        return runs[0] if runs else None

    async def _deployment_id(self, client, name: str):
        if name not in self._deployment_ids:
            try:
                self._deployment_ids[name] = (await client.read_deployment_by_name(name)).id
            except Exception as exc:
                raise _missing_deployment(name, exc) from exc
        return self._deployment_ids[name]

    async def _job_async(self, run: Any) -> Job:
        return await anyio.to_thread.run_sync(self._job, run)

    async def submit(self, job_cls: type[Job], **kwargs: Any) -> Job:
        sub = self._prepare(job_cls, kwargs)
        async with self._prefect() as client:
            run = await self._find_run(client, sub.job_id)
            action = plan(run)
            if action == "existing":
                return await self._job_async(run)
            if self._client.embedded:
                await anyio.to_thread.run_sync(_call_flow, self._client, job_cls, sub.parameters, sub.tags)
            elif action == "retry":
                await client.set_flow_run_state(run.id, _retry_state())
            else:
                variables = await anyio.to_thread.run_sync(_job_variables, job_cls, sub)
                return await self._job_async(
                    await client.create_flow_run_from_deployment(
                        await self._deployment_id(client, sub.deployment),
                        parameters=sub.parameters,
                        tags=sub.tags,
                        idempotency_key=sub.idempotency_key,
                        job_variables=variables,
                    )
                )
            return await self._job_async(await self._find_run(client, sub.job_id))

    async def retrieve(self, job_id: str) -> Job:
        async with self._prefect() as client:
            run = await self._find_run(client, job_id)
        if run is None:
            raise NotFoundError(f"no job {job_id}")
        return await self._job_async(run)

    async def list(
        self, status: JobStatus | list[JobStatus] | None = None, type: str | None = None, limit: int = 100
    ) -> list[Job]:
        tags = [JOB_TAG] + ([type_tag(type)] if type else [])
        async with self._prefect() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=_run_filter(tags, _statuses(status)), sort=_newest_first(), limit=limit
            )
        return [await self._job_async(run) for run in runs]

    async def cancel(self, job_id: str) -> Job:
        async with self._prefect() as client:
            run = await self._find_run(client, job_id)
            if run is None:
                raise NotFoundError(f"no job {job_id}")
            if status_of(run) not in TERMINAL_STATUSES:
                await client.set_flow_run_state(run.id, _cancel_state(run), force=True)
        return await self.retrieve(job_id)

    async def restart(self, job_id: str) -> Job:
        job = await self.retrieve(job_id)
        if not job.done:
            raise OWError(f"job {job_id} is {job.status}; cancel it before restarting")
        async with self._prefect() as client:
            run = await client.read_flow_run(job.flow_run_id)
            if run.deployment_id is not None:
                await client.set_flow_run_state(run.id, _retry_state(), force=True)
        if run.deployment_id is None:
            job_cls = get_job_type(job.type)
            await anyio.to_thread.run_sync(_call_flow, self._client, job_cls, run.parameters, tags_for(job_cls, job_id))
        return await self.retrieve(job_id)

    async def wait(
        self, job_id: str, timeout: float | None = None, poll_interval: float = 2.0, raise_on_failure: bool = True
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if job.done:
                return raise_for_failure(job) if raise_on_failure else job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(f"job {job_id} still {job.status} after {timeout} s; it goes on running")
            await anyio.sleep(poll_interval)

    async def logs(self, job_id: str) -> str:
        job = await self.retrieve(job_id)
        async with self._prefect() as client:
            return format_logs(await client.read_logs(log_filter=log_filter(job.flow_run_id)))

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        job = await self.retrieve(job_id)
        events = []
        async with self._prefect() as client:
            page = await client.read_events(filter=event_filter(job.flow_run_id), limit=EVENTS_PAGE)
            for _ in range(MAX_EVENT_PAGES):
                events += page.events
                if not page.next_page:
                    break
                page = await client.read_events_page(str(page.next_page))
        return format_events(events)

    async def download(self, job_id: str, dest: str | os.PathLike[str]) -> Path:
        job = raise_for_failure(await self.retrieve(job_id))
        return await anyio.to_thread.run_sync(self._download, job, dest)


class JobTypeResource:
    """``ow.<name>``: create and validate jobs of one registered type."""

    def __init__(self, jobs: Jobs | AsyncJobs, job_cls: type[Job]):
        self._jobs = jobs
        self._name = job_cls.name

    @property
    def job_cls(self) -> type[Job]:
        """The class registered under this name now (a class registered again, e.g. edited in a notebook, wins)."""
        return get_job_type(self._name)

    def __repr__(self) -> str:
        return f"<ow.{self.job_cls.name}: {self.job_cls.__name__} via {self.job_cls.deployment}>"

    def validate(self, **params: Any) -> str:
        """Validate parameters without submitting; return the job id they would get."""
        return self._jobs._prepare(self.job_cls, params).job_id

    def create(self, **params: Any):
        """Submit a job (or get the existing one with the same id). Awaitable on the async client."""
        return self._jobs.submit(self.job_cls, **params)

    def list(self, status: JobStatus | list[JobStatus] | None = None, limit: int = 100):
        return self._jobs.list(status=status, type=self.job_cls.name, limit=limit)

    def retrieve(self, job_id: str):
        return self._jobs.retrieve(job_id)


def _job_variables(job_cls: type[Job], sub: Submission) -> dict[str, Any]:
    """The image the job id was computed with (the RunPod worker runs exactly it), plus the job type's own
    variables (e.g. ``min_vram_gb``). Pools that have no `image` variable ignore it."""
    return {"image": sub.parameters["ow_job"]["image"], **job_cls.job_variables(sub.validated)}

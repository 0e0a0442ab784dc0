"""`ow.jobs` and `ow.<job type>`: submit, look up, wait for, cancel and restart jobs.

`AsyncJobs` is the one implementation, on Prefect's async client; `Jobs` (the sync client's) runs each of its
methods on the SDK's loop thread and does their blocking steps in the caller's thread (`_loop.py`). What to
do on submission is decided in `ow_prefect.jobs.submit`, without I/O. In embedded mode (no Prefect API URL) a
job's flow is called directly in this process, against Prefect's ephemeral API.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ow_prefect.client._logs import (
    LogTail,
    event_filter,
    format_events,
    format_logs,
    read_events,
    read_run_logs,
    until_logs_settled,
)
from ow_prefect.client._loop import blocking, iterate_sync, run_sync, same_docs
from ow_prefect.client._queries import (
    any_job_filter,
    as_flow_run_id,
    deployment_filter,
    newest_first,
    read_flow_run,
    read_runs,
    run_filter,
    statuses_of,
    untagged_filters,
)
from ow_prefect.client.runs import AsyncRuns
from ow_prefect.errors import (
    ConfigurationError,
    NotFoundError,
    OWError,
    ParameterError,
    PrefectUnavailableError,
    StorageError,
)
from ow_prefect.jobs.base import (
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    project_root,
    raise_for_failure,
)
from ow_prefect.jobs.registry import get_job_type
from ow_prefect.jobs.submit import (
    JOB_TAG,
    SubmissionOptions,
    accepting,
    history_key,
    idempotency_key,
    job_from_run,
    job_tag,
    newest_per_job,
    outputs_key,
    plan,
    status_of,
    submission_options,
    tag_value,
    tagged_by_ow,
    tags_for,
    type_tag,
)
from ow_prefect.retry import RetryRules
from ow_prefect.settings import get_settings
from ow_prefect.storage import check_relative_path

if TYPE_CHECKING:
    from ow_prefect.client._client import BaseOpenWeights


SCAN_PAGE = 200  # Prefect's server returns at most 200 runs per request
SCAN_PAGES = 25  # `list` reads at most this many pages of runs, newest first
# Runs of ow_prefect's deployments that never started their flow (so never tagged themselves) are found among
# this many of the newest not-completed runs of those flows.
UNTAGGED_SCAN = 200
LOG_POLL_SECONDS = 1.0  # how often following a job's logs asks for new lines


def _server_busy(error: BaseException) -> bool:
    """A 503 from the Prefect API after Prefect's own retries: a SQLite server refuses concurrent writes so
    ("database is locked") on a loaded machine."""
    response = getattr(error.__cause__, "response", None)
    return isinstance(error, PrefectUnavailableError) and getattr(response, "status_code", None) == 503


# A submit may be asked again: it looks the job id up first and creates with the job's idempotency key, so a
# create that did take effect is found, never doubled.
SUBMIT_RETRY = RetryRules(retry_on=_server_busy, attempts=4, initial_s=2.0, max_s=15.0)


class JobTimeoutError(OWError, TimeoutError):
    """`wait()` ran past its timeout; the job goes on."""


UNCLAIMED_STATES = ("SCHEDULED", "PAUSED")  # no worker holds the run: nothing runs that would need stopping


def _cancel_state(run: Any):
    from prefect.states import Cancelled, Cancelling

    # A run no worker has claimed is cancelled outright. A PENDING one is not: its process may be starting,
    # and Prefect lets a Cancelled run move on to Running. Like a running one it goes to CANCELLING, which
    # what runs it (the flow-run supervisor, the RunPod worker) watches for.
    if run.state and run.state.type.value in UNCLAIMED_STATES:
        return Cancelled(message="canceled through ow_prefect")
    return Cancelling()


def model_outputs(outputs: dict[str, Any]) -> dict[str, str]:
    """The model weights among a job's outputs (a fine-tune's `adapter`, its `merged` model): name -> id."""
    from ow_prefect.storage import ID_RE

    return {
        name: value
        for name, value in outputs.items()
        if isinstance(value, str) and (match := ID_RE.match(value)) and match["purpose"] in ("adapter", "model")
    }


def _retry_state():
    from prefect.states import Scheduled

    return Scheduled(name="AwaitingRetry", message="resubmitted through ow_prefect")


def _missing_deployment(name: str) -> ConfigurationError:
    return ConfigurationError(
        f"deployment '{name}' does not exist on this Prefect server. Register the built-in deployments with "
        "`prefect --no-prompt deploy --all` in the repository, or `python -m deployments.register --pool POOL`."
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
    options: SubmissionOptions

    def keeps(self, run: Any) -> bool:
        """Return this existing run as it is instead of running the job again (``create_on_failed_status=False``)."""
        return run is not None and status_of(run) in ("failed", "canceled") and status_of(run) not in self.options.rerun

    @property
    def tags(self) -> list[str]:
        return tags_for(self.job_cls, self.job_id)

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.deployment, self.job_id)


class AsyncJobs:
    """``ow.jobs`` of `AsyncOpenWeights`, and the one implementation of `Jobs`. Prefect is asked on the event
    loop; every blocking step (validation, storage, an embedded flow run) goes through `blocking`."""

    def __init__(self, client: BaseOpenWeights):
        self._client = client
        self._deployment_ids: dict[str, Any] = {}

    def _prefect(self):
        return self._client.async_prefect_client()

    # ---- blocking steps (validation and storage; run through `blocking`) ----------------------------------

    def _prepare(self, job_cls: type[Job], kwargs: dict[str, Any]) -> Submission:
        if "force_rerun" in kwargs:
            raise ParameterError(
                "force_rerun is an option of a flow run, not a job parameter (it is not part of the job id): to run "
                "a completed job again from Python, use ow.jobs.restart(job_id) or job.restart()"
            )
        kwargs, options = submission_options(kwargs)
        with self._client.prefect_settings():  # validation may ask Prefect (model="ftjob:latest")
            kwargs = job_cls.prepare_params(dict(kwargs), self._client.storage)
            validated = job_cls.validate_params(**kwargs)
        flow_parameters = job_cls.flow_parameters(validated)
        image, code = job_cls.image(), job_cls.code_hash()
        job_id = job_cls.compute_id(flow_parameters, image=image, code=code)
        envelope = {"id": job_id, "type": job_cls.name, "code_hash": code, "image": image}
        deployment = job_cls.deployment_for(validated) + get_settings().deployment_suffix
        return Submission(job_cls, job_id, validated, {**flow_parameters, "ow_job": envelope}, deployment, options)

    def _estimate_parts(self, job_cls: type[Job], kwargs: dict[str, Any]) -> tuple[Submission, Any, dict[str, Any]]:
        """What an estimate needs from this side: the submission (validated, its id and deployment), its work in
        tokens (reads the data files' sizes and the model's config) and the job variables a run would get."""
        sub = self._prepare(job_cls, kwargs)
        with self._client.prefect_settings():
            work = job_cls.work(sub.validated, self._client.storage)
        return sub, work, _job_variables(job_cls, sub)

    def _outputs(self, run: Any, job_id: str | None = None) -> dict[str, Any] | None:
        job_id = job_id or tag_value(run.tags, JOB_TAG)
        if status_of(run) != "completed" or job_id is None:
            return None
        try:
            return self._client.storage.get_json(outputs_key(job_id))
        except NotFoundError:
            return None

    def _job(self, run: Any, job_id: str | None = None, type_name: str | None = None, runs: int | None = None) -> Job:
        outputs = self._outputs(run, job_id)
        return job_from_run(run, outputs, self._client, job_id=job_id, type_name=type_name, run_count=runs)

    def _jobs(self, selected: list[tuple[str, str, Any]], attempts: dict[str, int]) -> list[Job]:
        return [self._job(run, job_id, type_name, attempts.get(job_id)) for job_id, type_name, run in selected]

    def _newest(self, runs: list[Any]) -> Job:
        """The job of its runs (newest first): the newest run, with the attempts of them all."""
        return self._job(runs[0], runs=sum(run.run_count for run in runs))

    def _identify(self, run: Any, entrypoint: str | None) -> tuple[str, str] | None:
        """The job id and type of a run that never tagged itself: the SDK's envelope, else computed from its
        parameters like its flow would (the first job type of its entrypoint that accepts them), else — the
        parameters are invalid — the flow run id."""
        envelope = (run.parameters or {}).get("ow_job") or {}
        if envelope.get("id") and envelope.get("type"):
            return envelope["id"], envelope["type"]
        with self._client.prefect_settings():
            candidates, found = accepting(run.parameters or {}, entrypoint)
        if found:
            cls, validated = found
            return cls.compute_id(cls.flow_parameters(validated)), cls.name
        return (str(run.id), candidates[0].name) if candidates else None

    def _untagged(self, runs: list[Any], entrypoints: dict[Any, str]) -> list[tuple[str, str, Any]]:
        found = []
        for run in runs:
            if not tagged_by_ow(run) and (identity := self._identify(run, entrypoints.get(run.deployment_id))):
                found.append((*identity, run))
        return found

    def _history(self, job_id: str) -> list[dict[str, Any]]:
        storage = self._client.storage
        try:
            entries = storage.get_json(history_key(job_id))
        except NotFoundError:
            try:
                return [storage.get_json(outputs_key(job_id))]  # recorded before histories existed
            except NotFoundError:
                return []
        return [storage.get_json(entry["key"]) for entry in entries]

    def _download(self, job: Job, dest: str | os.PathLike[str], weights: bool = False) -> Path:
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
        if weights:
            for name, file_id in model_outputs(job.outputs).items():
                self._client.storage.download(file_id, dest / name)
        return dest

    # ---- Prefect ----------------------------------------------------------------------------------------

    async def _find_run(self, client: Any, job_id: str) -> Any | None:
        runs = await client.read_flow_runs(flow_run_filter=run_filter([job_tag(job_id)]), sort=newest_first(), limit=1)
        return runs[0] if runs else None

    async def _deployment_id(self, client: Any, name: str) -> Any:
        if name not in self._deployment_ids:
            self._deployment_ids[name] = (await self._deployment(client, name)).id
        return self._deployment_ids[name]

    async def _deployment(self, client: Any, name: str) -> Any:
        from prefect.exceptions import ObjectNotFound

        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise _missing_deployment(name) from None

    async def _find_untagged(self, client: Any) -> list[tuple[str, str, Any]]:
        runs = await client.read_flow_runs(**untagged_filters(), sort=newest_first(), limit=UNTAGGED_SCAN)
        runs = [run for run in runs if not tagged_by_ow(run)]
        if not runs:
            return []
        deployments = await client.read_deployments(
            deployment_filter=deployment_filter({run.deployment_id for run in runs})
        )
        return await blocking(self._untagged, runs, {d.id: d.entrypoint for d in deployments})

    async def submit(self, job_cls: type[Job], **kwargs: Any) -> Job:
        """Submit a job of `job_cls` with these parameters, or return the job with the same id: as it is while
        pending, running or completed; run again (the same flow run) when it failed or was canceled."""
        sub = await blocking(self._prepare, job_cls, kwargs)
        return await SUBMIT_RETRY.acall(self._submit, job_cls, sub)

    async def _submit(self, job_cls: type[Job], sub: Any) -> Job:
        async with self._prefect() as client:
            run = await self._find_run(client, sub.job_id)
            action = plan(run)
            if action == "existing" or sub.keeps(run):
                return await blocking(self._job, run)
            if self._client.embedded:
                await blocking(_call_flow, self._client, job_cls, sub.parameters, sub.tags)
            elif action == "retry":
                if sub.options.job_variables:  # a rerun on other hardware (OpenWeights updates allowed_hardware)
                    variables = {**run.job_variables, **sub.options.job_variables}
                    await client.update_flow_run(run.id, job_variables=variables)
                await client.set_flow_run_state(run.id, _retry_state())
            else:
                variables = await blocking(_job_variables, job_cls, sub)
                run = await client.create_flow_run_from_deployment(
                    await self._deployment_id(client, sub.deployment),
                    parameters=sub.parameters,
                    tags=sub.tags,
                    idempotency_key=sub.idempotency_key,
                    job_variables=variables,
                )
                return await blocking(self._job, run)
            return await blocking(self._job, await self._find_run(client, sub.job_id))

    async def estimate(self, job_cls: type[Job], **kwargs: Any) -> Any:
        """What a job would cost if submitted now, submitting nothing: the GPU the RunPod worker would choose, its
        price, the expected runtime and the cost range (an `ow_prefect.costs.estimate.Estimate`; print it). On a
        pool that rents nothing (a process pool, embedded mode) the cost is 0."""
        from ow_prefect.costs.estimate import local_estimate
        from ow_prefect.costs.preview import estimate_on_pool

        sub, work, variables = await blocking(self._estimate_parts, job_cls, kwargs)
        fields = {"job_type": job_cls.name, "job_id": sub.job_id, "deployment": sub.deployment}
        if self._client.embedded:
            note = "its runtime on this machine is not estimated"
            return local_estimate(work, pool="(embedded)", pool_type="embedded", notes=[note], **fields)
        async with self._prefect() as client:
            deployment = await self._deployment(client, sub.deployment)
            pool = await client.read_work_pool(deployment.work_pool_name)
            if pool.type != "runpod":
                note = f"pool {pool.name!r} ({pool.type}) rents nothing; the runtime there is not estimated"
                return local_estimate(work, pool=pool.name, pool_type=pool.type, notes=[note], **fields)
            values = {**(deployment.job_variables or {}), **variables}
            return await estimate_on_pool(client, pool.base_job_template, values, work, pool=pool.name, **fields)

    async def retrieve(self, job_id: str) -> Job:
        """The job: its newest run (run_count counts every run's attempts). A run started outside the SDK that
        ended before its flow started is found by the id its parameters give (or by its flow run id)."""
        async with self._prefect() as client:
            runs = await client.read_flow_runs(flow_run_filter=run_filter([job_tag(job_id)]), sort=newest_first())
            if runs:
                return await blocking(self._newest, runs)
            untagged = [entry for entry in await self._find_untagged(client) if entry[0] == job_id]
            if not untagged and (run_id := as_flow_run_id(job_id)) and (run := await read_flow_run(client, run_id)):
                untagged = _tagged([run])
        if not untagged:
            raise NotFoundError(f"no job {job_id}")
        job_id, type_name, run = untagged[0]
        return await blocking(self._job, run, job_id, type_name, sum(entry[2].run_count for entry in untagged))

    async def list(
        self, status: JobStatus | list[JobStatus] | None = None, type: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs newest first, each once (its newest run), filtered by the status of that run. Runs that never
        started their flow (crashed or cancelled before, or still waiting) are included."""
        statuses = statuses_of(status)
        tags = [JOB_TAG] + ([type_tag(type)] if type else [])
        async with self._prefect() as client:
            found = await self._find_untagged(client)
            for page in range(SCAN_PAGES):
                runs = await read_runs(client, run_filter(tags), SCAN_PAGE, offset=page * SCAN_PAGE)
                found += _tagged(runs)
                if len(runs) < SCAN_PAGE or len(_select(found, statuses, type, limit)) >= limit:
                    break
            selected = _select(found, statuses, type, limit)
            ids = [job_id for job_id, _, _ in selected]
            runs = await read_runs(client, any_job_filter(ids), SCAN_PAGES * SCAN_PAGE) if selected else []
        return await blocking(self._jobs, selected, _attempts(found, runs))

    async def cancel(self, job_id: str) -> Job:
        """Cancel the job's run (a run no worker claimed yet at once; a running one through CANCELLING)."""
        async with self._prefect() as client:
            run = await self._find_run(client, job_id)
            if run is None:
                raise NotFoundError(f"no job {job_id}")
            if status_of(run) not in TERMINAL_STATUSES:
                await client.set_flow_run_state(run.id, _cancel_state(run), force=True)
        return await self.retrieve(job_id)

    async def restart(self, job_id: str) -> Job:
        """Run a finished job again (same flow run, run count + 1; embedded runs start a new flow run). A
        completed job really runs again (``force_rerun``); its earlier outputs stay in `history()`."""
        job = await self.retrieve(job_id)
        if not job.done:
            raise OWError(f"job {job_id} is {job.status}; cancel it before restarting")
        async with self._prefect() as client:
            run = await client.read_flow_run(job.flow_run_id)
            parameters = _restart_parameters(job, run)
            if run.deployment_id is not None:
                if parameters != run.parameters:
                    await client.update_flow_run(run.id, parameters=parameters)
                await client.set_flow_run_state(run.id, _retry_state(), force=True)
        if run.deployment_id is None:
            job_cls = get_job_type(job.type)
            await blocking(_call_flow, self._client, job_cls, parameters, tags_for(job_cls, job_id))
        return await self.retrieve(job_id)

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        """The outputs of every completed run of the job, oldest first (the last is `job.outputs`); each has
        `flow_run_id`, `run_count` and `completed_at`. Reruns add to it, never replace."""
        return await blocking(self._history, job_id)

    async def wait(
        self, job_id: str, timeout: float | None = None, poll_interval: float = 2.0, raise_on_failure: bool = True
    ) -> Job:
        """The job once it ended; `JobFailedError` if it failed or was canceled (unless not `raise_on_failure`),
        `JobTimeoutError` after `timeout` seconds (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if job.done:
                return raise_for_failure(job) if raise_on_failure else job
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeoutError(f"job {job_id} still {job.status} after {timeout} s; it goes on running")
            await anyio.sleep(poll_interval)

    async def logs(self, job_id: str) -> str:
        """Every log line of the job's latest run so far, oldest first: ``<timestamp> <message>`` (for a run that
        has just ended, read once its last lines can have arrived: a few seconds after its end)."""
        job = await self.retrieve(job_id)
        async with self._prefect() as client:
            return format_logs(await read_run_logs(client, job.flow_run_id))

    async def _follow_logs(self, job_id: str, poll_interval: float = LOG_POLL_SECONDS) -> AsyncGenerator[str, None]:
        """The job's log lines as they arrive, until it ended (``ow logs -f``)."""
        tail = LogTail((await self.retrieve(job_id)).flow_run_id)
        while True:
            done = (await self.retrieve(job_id)).done
            async with self._prefect() as client:
                if done:  # logs are sent in batches: the last lines can reach the server after the final state
                    await until_logs_settled(client, tail.flow_run_id)
                lines = format_logs(await tail.read(client))
            for line in lines.splitlines():
                yield line
            if done:
                return
            await anyio.sleep(poll_interval)

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        """The events of the job's latest run (Prefect's and ow_prefect's), oldest first."""
        job = await self.retrieve(job_id)
        async with self._prefect() as client:
            return format_events(await read_events(client, event_filter(job.flow_run_id)))

    async def download(
        self, job_id: str, dest: str | os.PathLike[str], only_last_run: bool = True, weights: bool = False
    ) -> Path:
        """Download every result file of a completed job into `dest` (kept at its path under uploads/); with
        `weights`, also the model weights it stored (`adapter/`, `merged/`: see `model_outputs`); with
        ``only_last_run=False``, each run's logs, event files and results into ``dest/<run id>/``."""
        if not only_last_run:
            runs = await AsyncRuns(self._client).list(job_id=job_id, limit=200)
            return await blocking(_download_runs, runs, dest)
        job = raise_for_failure(await self.retrieve(job_id))
        return await blocking(self._download, job, dest, weights)

    async def find(self, limit: int = 1000, type: str | None = None, **params: Any) -> list[Job]:
        """Jobs whose parameters have these values (a dict value matches the keys it names), newest first:
        ``ow.jobs.find(model="Qwen/Qwen3-4B", meta={"group": "sweep"})``. Looks through the newest `limit` runs
        (of one job `type`); Prefect cannot query parameters, so they are compared here."""
        async with self._prefect() as client:
            runs = await read_runs(client, run_filter([JOB_TAG] + ([type_tag(type)] if type else [])), limit)
        return await blocking(lambda: [self._job(run) for run in _matching(runs, params, self._client)])


@same_docs(AsyncJobs)
class Jobs:
    """``ow.jobs`` of `OpenWeights`: `AsyncJobs` run on the SDK's loop thread, blocking steps in this one."""

    def __init__(self, client: BaseOpenWeights):
        self._core = AsyncJobs(client)

    def _prepare(self, job_cls: type[Job], kwargs: dict[str, Any]) -> Submission:
        return self._core._prepare(job_cls, kwargs)

    def submit(self, job_cls: type[Job], **kwargs: Any) -> Job:
        return run_sync(self._core.submit(job_cls, **kwargs))

    def estimate(self, job_cls: type[Job], **kwargs: Any) -> Any:
        return run_sync(self._core.estimate(job_cls, **kwargs))

    def retrieve(self, job_id: str) -> Job:
        return run_sync(self._core.retrieve(job_id))

    def list(
        self, status: JobStatus | list[JobStatus] | None = None, type: str | None = None, limit: int = 100
    ) -> list[Job]:
        return run_sync(self._core.list(status, type, limit))

    def cancel(self, job_id: str) -> Job:
        return run_sync(self._core.cancel(job_id))

    def restart(self, job_id: str) -> Job:
        return run_sync(self._core.restart(job_id))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return run_sync(self._core.history(job_id))

    def wait(
        self, job_id: str, timeout: float | None = None, poll_interval: float = 2.0, raise_on_failure: bool = True
    ) -> Job:
        return run_sync(self._core.wait(job_id, timeout, poll_interval, raise_on_failure))

    def logs(self, job_id: str) -> str:
        return run_sync(self._core.logs(job_id))

    def _follow_logs(self, job_id: str, poll_interval: float = LOG_POLL_SECONDS) -> Iterator[str]:
        return iterate_sync(self._core._follow_logs(job_id, poll_interval))

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return run_sync(self._core.events(job_id))

    def download(
        self, job_id: str, dest: str | os.PathLike[str], only_last_run: bool = True, weights: bool = False
    ) -> Path:
        return run_sync(self._core.download(job_id, dest, only_last_run, weights))

    def find(self, limit: int = 1000, type: str | None = None, **params: Any) -> list[Job]:
        return run_sync(self._core.find(limit, type, **params))


def _tagged(runs: list[Any]) -> list[tuple[str, str, Any]]:
    """(job id, type, run) from the runs' tags; a run without them is named by its flow run id."""
    return [
        (tag_value(run.tags, JOB_TAG) or str(run.id), tag_value(run.tags, "ow-type") or "custom", run) for run in runs
    ]


def _select(
    found: list[tuple[str, str, Any]], statuses: list[JobStatus] | None, type: str | None, limit: int
) -> list[tuple[str, str, Any]]:
    """One entry per job, its newest run, newest job first; filtered by the status of that run and type."""
    found = sorted(found, key=lambda entry: entry[2].expected_start_time or entry[2].created, reverse=True)
    selected = [
        (job_id, type_name, run)
        for job_id, (type_name, run) in newest_per_job(found).items()
        if (statuses is None or status_of(run) in statuses) and (type is None or type_name == type)
    ]
    return selected[:limit]


def _attempts(found: list[tuple[str, str, Any]], runs: list[Any]) -> dict[str, int]:
    """Job id -> the attempts of all its runs (`found`, plus `runs`: every tagged run of the listed jobs)."""
    by_run = {run.id: (job_id, run) for job_id, _, run in found}
    by_run.update({run.id: (tag_value(run.tags, JOB_TAG), run) for run in runs})
    attempts: dict[str, int] = {}
    for job_id, run in by_run.values():
        attempts[job_id] = attempts.get(job_id, 0) + run.run_count
    return attempts


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

    def estimate(self, **params: Any):
        """What `create(**params)` would cost now, creating nothing: the GPU the RunPod worker would choose, its
        price, the expected runtime and cost range (``print(ow.fine_tuning.estimate(...))``). Awaitable on the
        async client."""
        return self._jobs.estimate(self.job_cls, **params)

    def list(self, status: JobStatus | list[JobStatus] | None = None, limit: int = 100):
        return self._jobs.list(status=status, type=self.job_cls.name, limit=limit)

    def retrieve(self, job_id: str):
        return self._jobs.retrieve(job_id)

    def cancel(self, job_id: str):
        return self._jobs.cancel(job_id)

    def restart(self, job_id: str):
        return self._jobs.restart(job_id)

    def find(self, limit: int = 1000, **params: Any):
        """Jobs of this type whose parameters have these values (see ``ow.jobs.find``)."""
        return self._jobs.find(limit=limit, type=self.job_cls.name, **params)


def _matches(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(value, dict) and all(_matches(value.get(k), v) for k, v in wanted.items())
    return value == wanted


def _matching(runs: list[Any], params: dict[str, Any], client: Any) -> list[Any]:
    """The runs whose job parameters (as `job.params` shows them) have `params`; one per job, its newest."""
    found, seen = [], set()
    for run in runs:  # newest first; a job rerun embedded has several runs
        job = job_from_run(run, None, client)
        if job.id not in seen and all(_matches(job.params.get(k), v) for k, v in params.items()):
            found.append(run)
        seen.add(job.id)
    return found


def _download_runs(runs: list[Any], dest: str | os.PathLike[str]) -> Path:
    dest = Path(dest)
    for run in runs:
        run.download(dest / run.id)
    return dest


def _restart_parameters(job: Job, run: Any) -> dict[str, Any]:
    """A completed job's run gets ``force_rerun``: its flow would otherwise return the stored outputs."""
    parameters = dict(run.parameters or {})
    if job.status == "completed":
        parameters["force_rerun"] = True
    return parameters


def _job_variables(job_cls: type[Job], sub: Submission) -> dict[str, Any]:
    """The image the job id was computed with (the RunPod worker runs exactly it), plus the job type's own
    variables (e.g. ``min_vram_gb``), then the submission's (``allowed_hardware``: ``gpu_types``, ...). Pools
    that have no such variable ignore it."""
    return {
        "image": sub.parameters["ow_job"]["image"],
        **job_cls.job_variables(sub.validated),
        **sub.options.job_variables,
    }

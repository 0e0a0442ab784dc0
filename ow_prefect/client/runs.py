"""`ow.runs` and `ow.events`: OpenWeights' runs and events, read from Prefect. `AsyncRuns` and `AsyncEvents` are
the one implementation; the sync client's `Runs` and `Events` run them on the SDK's loop thread (`_loop.py`).

A run is a flow run of a job. Server mode keeps one flow run per job (a rerun puts the same run back to
Scheduled and counts up its `run_count`); embedded mode starts a new flow run each time a job runs again. A
run's events are ow_prefect's events on it (`ow.run.log`, `ow.train.*`, `ow.pod.*`), each as OpenWeights'
row ``{"id", "run_id", "job_id", "created_at", "event", "data", "file"}``; they reach the server within a few
seconds of being emitted. A run's logs become a file when asked for (`run.log_file`, purpose ``log``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ow_prefect.client._logs import event_filter, event_rows, format_logs, read_events, read_run_logs
from ow_prefect.client._loop import run_sync, same_docs
from ow_prefect.client._queries import as_flow_run_id, read_flow_run, read_runs, run_filter, statuses_of
from ow_prefect.errors import NotFoundError
from ow_prefect.jobs.submit import JOB_TAG, job_tag, outputs_key, status_of, tag_value
from ow_prefect.run_log import latest_values

if TYPE_CHECKING:
    from ow_prefect.client._client import BaseOpenWeights

OW_EVENTS = "ow."  # ow_prefect's own events; Prefect's state events of the run are left out
LOG_PURPOSE = "log"


class Run:
    """One flow run of a job: ``id``, ``job_id``, ``status``, ``created_at``, ``worker_id`` (the pod or process
    that ran it), ``run_count``; ``log_file``, ``events``, ``download(dir)``. Item access works too. It reads
    synchronously, from either client."""

    def __init__(self, flow_run: Any, client: BaseOpenWeights):
        self._client = client
        self.id = str(flow_run.id)
        self.job_id = tag_value(flow_run.tags, JOB_TAG)
        self.status = status_of(flow_run)
        self.created_at = flow_run.created.timestamp() if flow_run.created else None
        self.worker_id = flow_run.infrastructure_pid
        self.run_count = flow_run.run_count

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, job_id={self.job_id!r}, status={self.status!r})"

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def logs(self) -> str:
        """Every log line of this run so far, oldest first."""
        return run_sync(_logs(self._client, self.id))

    @property
    def log_file(self) -> str:
        """The id of a file holding this run's logs so far (stored when asked for, content-addressed)."""
        return self._client.storage.put_bytes(self.logs().encode(), LOG_PURPOSE, filename=f"{self.id}.log").id

    @property
    def events(self) -> list[dict[str, Any]]:
        return run_sync(_events(self._client, [self.id]))

    def download(self, target_dir: str | os.PathLike[str]) -> Path:
        """This run's logs (``<run id>.log``), the files its events name (at their ``path``, else their id) and,
        when this run recorded the job's outputs, the job's result files (at their paths)."""
        target = Path(target_dir)
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{self.id}.log").write_text(self.logs())
        storage = self._client.storage
        for event in self.events:
            file_id = event["data"].get("file") if isinstance(event["data"].get("file"), str) else event["file"]
            if file_id:
                storage.download(file_id, target / str(event["data"].get("path") or file_id.replace(":", "-")))
        try:
            outputs = storage.get_json(outputs_key(self.job_id)) if self.job_id else {}
        except NotFoundError:
            outputs = {}
        if outputs.get("flow_run_id") == self.id:
            for relpath, file_id in (outputs.get("files") or {}).items():
                storage.download(file_id, target / relpath)
        return target


async def _logs(client: BaseOpenWeights, run_id: str) -> str:
    async with client.async_prefect_client() as prefect:
        return format_logs(await read_run_logs(prefect, run_id))


async def _flow_runs(client: BaseOpenWeights, job_id: str | None, limit: int, statuses: list[str] | None = None):
    tags = [job_tag(job_id)] if job_id else [JOB_TAG]
    async with client.async_prefect_client() as prefect:
        return await read_runs(prefect, run_filter(tags, statuses), limit)


async def _events(client: BaseOpenWeights, run_ids: list[str]) -> list[dict[str, Any]]:
    if not run_ids:
        return []
    async with client.async_prefect_client() as prefect:
        return event_rows(await read_events(prefect, event_filter(run_ids, prefix=OW_EVENTS)))


class AsyncRuns:
    """``ow.runs`` of `AsyncOpenWeights`, and the one implementation of `Runs` (the `Run` handles it returns
    read synchronously)."""

    def __init__(self, client: BaseOpenWeights):
        self._client = client

    async def list(
        self, job_id: str | None = None, worker_id: str | None = None, limit: int = 10, status: str | None = None
    ) -> list[Run]:
        """The newest `limit` runs (of one job, on one worker, in one status), oldest first: ``runs[-1]`` is the
        latest."""
        flow_runs = await _flow_runs(self._client, job_id, limit, statuses_of(status))
        runs = [Run(run, self._client) for run in reversed(flow_runs)]
        return [run for run in runs if worker_id is None or run.worker_id == worker_id]

    async def retrieve(self, run_id: str) -> Run:
        """The run with this id."""
        flow_run_id = as_flow_run_id(run_id)
        if flow_run_id is not None:
            async with self._client.async_prefect_client() as prefect:
                flow_run = await read_flow_run(prefect, flow_run_id)
            if flow_run is not None:
                return Run(flow_run, self._client)
        raise NotFoundError(f"no run {run_id}" + ("" if flow_run_id else ": a run id is a UUID"))


@same_docs(AsyncRuns)
class Runs:
    """``ow.runs`` of `OpenWeights`: the flow runs of jobs (`AsyncRuns` run on the SDK's loop thread)."""

    def __init__(self, client: BaseOpenWeights):
        self._core = AsyncRuns(client)

    def list(
        self, job_id: str | None = None, worker_id: str | None = None, limit: int = 10, status: str | None = None
    ) -> list[Run]:
        return run_sync(self._core.list(job_id, worker_id, limit, status))

    def retrieve(self, run_id: str) -> Run:
        return run_sync(self._core.retrieve(run_id))


class AsyncEvents:
    """``ow.events`` of `AsyncOpenWeights`, and the one implementation of `Events`: what jobs logged
    (``ow.run.log``) and what ow_prefect's flows report (``ow.train.*``)."""

    def __init__(self, client: BaseOpenWeights):
        self._client = client

    async def list(self, job_id: str | None = None, run_id: str | None = None) -> list[dict[str, Any]]:
        """The events of one run, or of every run of a job, oldest first."""
        if run_id:
            return await _events(self._client, [run_id])
        if job_id:
            runs = await _flow_runs(self._client, job_id, 200)
            return await _events(self._client, [str(run.id) for run in runs])
        raise ValueError("give job_id or run_id: ow.events.list(job_id=job.id) or ow.events.list(run_id=run.id)")

    async def latest(
        self, fields: list[str] | str = "*", job_id: str | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        """The latest value of each of `fields` (every field for ``"*"``) over the events' data."""
        events = await self.list(job_id=job_id, run_id=run_id)
        latest = latest_values([event["data"] for event in events])
        return latest if fields == "*" else {field: latest[field] for field in fields if field in latest}


@same_docs(AsyncEvents)
class Events:
    """``ow.events`` of `OpenWeights` (`AsyncEvents` run on the SDK's loop thread)."""

    def __init__(self, client: BaseOpenWeights):
        self._core = AsyncEvents(client)

    def list(self, job_id: str | None = None, run_id: str | None = None) -> list[dict[str, Any]]:
        return run_sync(self._core.list(job_id, run_id))

    def latest(
        self, fields: list[str] | str = "*", job_id: str | None = None, run_id: str | None = None
    ) -> dict[str, Any]:
        return run_sync(self._core.latest(fields, job_id, run_id))

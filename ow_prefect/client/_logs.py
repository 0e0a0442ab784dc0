"""A flow run's logs and events: filters, reading them page by page, formatting (for `ow.jobs` and `ow.runs`)."""

from __future__ import annotations

import datetime
import itertools
from typing import Any

LOGS_PAGE = 200  # the server's largest page of logs
# `LogTail` reads again this far behind the newest line it saw: lines of one run come from several processes
# (worker, flow, pod), each sending batches every few seconds, so a line can reach the server after newer ones.
LATE_LOGS = datetime.timedelta(seconds=60)
# A run's logs are read this long after its end at the earliest: its engine logs "Finished in state ..." after
# the final state is set, and Prefect sends log batches every 2 s (and at exit), so right after a job turns
# `completed` its last lines are still on their way. Reading a run that ended earlier than this never waits.
LOGS_SETTLE_SECONDS = 5.0


def log_filter(flow_run_id: str, since: datetime.datetime | None = None):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp

    return LogFilter(
        flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
        timestamp=LogFilterTimestamp(after_=since) if since else None,
    )


async def read_logs(client: Any, flow_run_id: str, since: datetime.datetime | None = None) -> list[Any]:
    """Every log line of the flow run (from `since` on), oldest first, page by page. Lines that arrive
    meanwhile can only shift the pages forward, so a line read twice is kept once and none is missed."""
    logs: dict[Any, Any] = {}
    for offset in itertools.count(0, LOGS_PAGE):
        page = await client.read_logs(log_filter=log_filter(flow_run_id, since), limit=LOGS_PAGE, offset=offset)
        logs.update((log.id, log) for log in page)
        if len(page) < LOGS_PAGE:
            break
    return sorted(logs.values(), key=lambda log: log.timestamp)


async def until_logs_settled(client: Any, flow_run_id: str) -> None:
    """Return once the run's last log lines can have reached the server: at once for a run that is not over (or
    was deleted) or that ended LOGS_SETTLE_SECONDS ago or more; else when that time has passed."""
    import anyio
    from prefect.exceptions import ObjectNotFound

    try:
        run = await client.read_flow_run(flow_run_id)
    except ObjectNotFound:  # a deleted run: whatever lines are left
        return
    if run.end_time is not None:
        settled = run.end_time + datetime.timedelta(seconds=LOGS_SETTLE_SECONDS)
        wait = (settled - datetime.datetime.now(datetime.UTC)).total_seconds()
        if wait > 0:
            await anyio.sleep(min(wait, LOGS_SETTLE_SECONDS))


async def read_run_logs(client: Any, flow_run_id: str) -> list[Any]:
    """Every log line of the flow run, oldest first; a run that has just ended is read once its logs settled
    (`until_logs_settled`), so that the logs of a finished run are whole (`job.logs()`, `run.log_file`,
    `job.download()` right after `wait()`)."""
    await until_logs_settled(client, flow_run_id)
    return await read_logs(client, flow_run_id)


class LogTail:
    """The lines of a flow run's logs not read before, at each `read` (`ow logs -f`); a line that reaches the
    server late, behind newer ones, comes at the next read."""

    def __init__(self, flow_run_id: str):
        self.flow_run_id = flow_run_id
        self._seen: set[Any] = set()
        self._newest: datetime.datetime | None = None

    async def read(self, client: Any) -> list[Any]:
        since = self._newest - LATE_LOGS if self._newest else None
        new = [log for log in await read_logs(client, self.flow_run_id, since) if log.id not in self._seen]
        self._seen.update(log.id for log in new)
        if new:
            self._newest = max(self._newest or new[-1].timestamp, new[-1].timestamp)
        return new


def format_logs(logs: list[Any]) -> str:
    ordered = sorted(logs, key=lambda log: log.timestamp)
    return "\n".join(f"{log.timestamp.isoformat()} {log.message}" for log in ordered)


def event_filter(flow_run_id: str | list[str], prefix: str | None = None):
    """Events of one flow run (or several), optionally only those whose name starts with `prefix`."""
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

    ids = [flow_run_id] if isinstance(flow_run_id, str) else flow_run_id
    names = EventNameFilter(prefix=[prefix]) if prefix else None
    return EventFilter(any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{i}" for i in ids]), event=names)


EVENTS_PAGE = 50  # the server's largest page
MAX_EVENT_PAGES = 20


async def read_events(client: Any, filter: Any) -> list[Any]:
    """Every event matching `filter` (at most MAX_EVENT_PAGES pages)."""
    events: list[Any] = []
    page = await client.read_events(filter=filter, limit=EVENTS_PAGE)
    for _ in range(MAX_EVENT_PAGES):
        events += page.events
        if not page.next_page:
            break
        page = await client.read_events_page(str(page.next_page))
    return events


def format_events(events: list[Any]) -> list[dict[str, Any]]:
    return [
        {"event": e.event, "occurred": e.occurred.isoformat(), "resource": e.resource.id, "payload": e.payload}
        for e in sorted(events, key=lambda e: e.occurred)
    ]


def event_rows(events: list[Any]) -> list[dict[str, Any]]:
    """Events as OpenWeights' rows, oldest first: ``{"id", "run_id", "job_id", "created_at", "event", "data",
    "file"}``. ``data`` is what was logged (``ow.run.log``) or the event's payload (``ow.train.*``, ...)."""
    from ow_prefect.run_log import RUN_LOG_EVENT

    rows = []
    for e in sorted(events, key=lambda e: e.occurred):
        payload = dict(e.payload or {})
        if e.event == RUN_LOG_EVENT:
            data, file = payload.get("data") or {}, payload.get("file")
        else:
            data, file = payload, payload.get("file")
        flow_runs = [r.id for r in e.related if r.id.startswith("prefect.flow-run.")]
        if e.resource.id.startswith("prefect.flow-run."):
            flow_runs.insert(0, e.resource.id)
        job = e.resource.id[len("ow.job.") :] if e.resource.id.startswith("ow.job.") else None
        rows.append(
            {
                "id": str(e.id),
                "run_id": flow_runs[0][len("prefect.flow-run.") :] if flow_runs else None,
                "job_id": job,
                "created_at": e.occurred.isoformat(),
                "event": e.event,
                "data": data,
                "file": file,
            }
        )
    return rows

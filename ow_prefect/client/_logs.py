"""Filters and formatting for a job's logs and events (shared by both twins)."""

from __future__ import annotations

from typing import Any


def log_filter(flow_run_id: str):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))


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


def read_events(client: Any, filter: Any) -> list[Any]:
    """Every event matching `filter` (at most MAX_EVENT_PAGES pages), with Prefect's sync client."""
    events: list[Any] = []
    page = client.read_events(filter=filter, limit=EVENTS_PAGE)
    for _ in range(MAX_EVENT_PAGES):
        events += page.events
        if not page.next_page:
            break
        page = client.read_events_page(str(page.next_page))
    return events


async def read_events_async(client: Any, filter: Any) -> list[Any]:
    """`read_events` with Prefect's async client."""
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

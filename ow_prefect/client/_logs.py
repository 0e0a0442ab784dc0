"""Filters and formatting for a job's logs and events (shared by both twins)."""

from __future__ import annotations

from typing import Any


def log_filter(flow_run_id: str):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))


def format_logs(logs: list[Any]) -> str:
    ordered = sorted(logs, key=lambda log: log.timestamp)
    return "\n".join(f"{log.timestamp.isoformat()} {log.message}" for log in ordered)


def event_filter(flow_run_id: str):
    from prefect.events.filters import EventAnyResourceFilter, EventFilter

    return EventFilter(any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]))


EVENTS_PAGE = 50  # the server's largest page
MAX_EVENT_PAGES = 20


def format_events(events: list[Any]) -> list[dict[str, Any]]:
    return [
        {"event": e.event, "occurred": e.occurred.isoformat(), "resource": e.resource.id, "payload": e.payload}
        for e in sorted(events, key=lambda e: e.occurred)
    ]

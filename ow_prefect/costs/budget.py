"""A work pool's daily budget: the RunPod worker creates no new pod once what the pool's pods cost today (UTC)
reaches `daily_budget`, a field of the pool's form.

What a pool cost today is what the workers recorded: every `ow.pod.terminated` (and `ow.pod.handed_off`: a run's
share of a pod handed to the next run) event of the pool's pods since 00:00 UTC (its `cost_usd`: a pod counts on
the day it ended) plus what the pool's pods still running have cost
since 00:00 UTC (their price × time). The budget is the pool's: a value set on a deployment or a run is ignored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

TERMINATED_EVENT = "ow.pod.terminated"
HANDED_OFF_EVENT = "ow.pod.handed_off"  # a run's time on a pod that went on to the next run (workers/handoff.py)
EVENTS_PAGE = 50  # the most the events API returns per page


def pool_resource(work_pool_id: Any) -> dict[str, str]:
    """The related resource that ties a pod's events to its work pool (what the ledger filters on)."""
    return {"prefect.resource.id": f"prefect.work-pool.{work_pool_id}", "prefect.resource.role": "work-pool"}


def daily_budget(work_pool: Any) -> float | None:
    """The pool's `daily_budget` (its base job template's default), or None."""
    properties = (work_pool.base_job_template or {}).get("variables", {}).get("properties", {})
    value = properties.get("daily_budget", {}).get("default")
    return float(value) if value is not None else None


@dataclass(frozen=True)
class Spend:
    ended: float  # pods that ended today
    running: float  # pods still running, since 00:00 UTC
    pods: int

    @property
    def total(self) -> float:
        return self.ended + self.running


async def spent_today(client: Any, work_pool_id: Any, running: Sequence[tuple[float, float]]) -> Spend:
    """What the pool's pods cost since 00:00 UTC. `running`: (price per hour, creation epoch seconds) of its live
    pods."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventRelatedFilter

    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ended, count = 0.0, 0
    page = await client.read_events(
        filter=EventFilter(
            occurred=EventOccurredFilter(since=midnight, until=now),
            event=EventNameFilter(name=[TERMINATED_EVENT, HANDED_OFF_EVENT]),
            related=EventRelatedFilter(id=[pool_resource(work_pool_id)["prefect.resource.id"]]),
        ),
        limit=EVENTS_PAGE,
    )
    while True:  # every page: a busy pool ends more pods a day than one page holds
        ended += sum(float(event.payload.get("cost_usd") or 0) for event in page.events)
        count += len(page.events)
        if not page.next_page:
            break
        page = await client.read_events_page(str(page.next_page))
    start = midnight.timestamp()
    live = sum(price * max(0.0, time.time() - max(created, start)) / 3600 for price, created in running)
    return Spend(ended, live, count + len(running))


def refusal(budget: float, spend: Spend, pool_name: str) -> str:
    return (
        f"Work pool {pool_name!r} reached its daily budget: ${spend.total:.2f} of ${budget:.2f} spent today (UTC) "
        f"by {spend.pods} pod(s) (${spend.ended:.2f} ended, ${spend.running:.2f} still running). No new pod is "
        "created until 00:00 UTC; raise daily_budget on the pool to go on today."
    )

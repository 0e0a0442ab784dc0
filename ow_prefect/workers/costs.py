"""What each RunPod pod costs, and the events that follow it: a room of the `runpod` worker (workers/runpod.py).

`PodRecord` is one pod of one attempt of a flow run (its GPU, cloud, price and creation time). From it the worker
emits `ow.pod.created`, `ow.pod.running` and `ow.pod.terminated` events related to the flow run, and, when the pod
is deleted (by the run's watch or by the reconciler), appends a row to the run's `runpod-cost-<flow run id>` table
artifact: price × time from create to delete, one row per pod over every attempt. A pod handed from run to run
(workers/handoff.py) gives each run a row of its own: from the create or the hand-over to the delete or the next
hand-over, its warm idle time included (`warm_idle_s`). Each event is also related to the
pod's work pool: the `ow.pod.terminated` events are the ledger of the pool's `daily_budget`
(ow_prefect/costs/budget.py).

`CostAccounting` also says when a pod costs too much: once its price × time since its create reaches the run's
`max_cost`, the run ends (Failed, CostCapped; each pod of a run counted on its own, as its cost row). How the run is
stopped (a checkpoint first) is in workers/stopping.py; the checks before a pod exists (estimate, `max_cost`, daily
budget) in ow_prefect/costs/guard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.client.schemas.objects import FlowRun
from prefect.events import emit_event
from prefect.states import Failed

from ow_prefect.costs.budget import pool_resource
from ow_prefect.runpod.models import Pod
from ow_prefect.runpod.offers import Candidate

MAX_COST_MARKER = "OW_POD_MAX_COST"  # USD: the reconciler stops a pod whose price × age reaches it


@dataclass
class PodRecord:
    """One pod of one attempt of a flow run: what its cost and events are computed from."""

    pod: Pod
    flow_run_id: UUID
    flow_run_name: str
    price_per_hour: float
    created_at: float = field(default_factory=time.time)
    gpu: str = ""
    cloud: str = ""
    memory_gb: float = 0.0  # over all its GPUs: what a run handed this pod may need at most
    handed_from: UUID | None = None  # the run this pod was handed over from (workers/handoff.py)
    warm_idle: float = 0.0  # seconds it waited warm for the next run after this run completed
    flow_started: bool = False

    @classmethod
    def of(cls, pod: Pod, flow_run: FlowRun, candidate: Candidate) -> PodRecord:
        price = pod.cost or candidate.price_per_hour
        return cls(
            pod,
            flow_run.id,
            flow_run.name,
            price,
            gpu=f"{candidate.count}x {candidate.gpu_id}",
            cloud=pod.cloud or candidate.cloud,
            memory_gb=candidate.memory_gb * candidate.count,
        )

    @classmethod
    def found(cls, pod: Pod, flow_run_id: UUID, flow_run_name: str) -> PodRecord:
        """A pod the reconciler found: its creation time and price come from RunPod."""
        created = _parse_time(pod.created_at) or time.time()
        gpu = f"{pod.gpu.count}x {pod.gpu.id}" if pod.gpu else "CPU"
        return cls(pod, flow_run_id, flow_run_name, pod.cost or 0.0, created_at=created, gpu=gpu, cloud=pod.cloud or "")

    @property
    def pod_id(self) -> str:
        return self.pod.id

    def cost_so_far(self) -> float:
        return self.price_per_hour * max(0.0, time.time() - self.created_at) / 3600

    def event_resource(self) -> dict[str, str]:
        return {
            "prefect.resource.id": f"runpod.pod.{self.pod_id}",
            "prefect.resource.name": self.pod.name,
            "ow.pod.gpu": self.gpu,
            "ow.pod.cloud": self.cloud,
        }

    def related(self) -> list[dict[str, str]]:
        return [
            {
                "prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": self.flow_run_name,
            }
        ]

    def payload(self) -> dict[str, Any]:
        return {
            "pod_id": self.pod_id,
            "gpu": self.gpu,
            "cloud": self.cloud,
            "data_center": self.pod.data_center_id,
            "price_per_hour": self.price_per_hour,
        }


class RunLocks:
    """One asyncio lock per flow run (its cost table's read-modify-write), dropped with its last user."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class CostAccounting:
    """The worker's side of accounting (a mixin of `RunPodWorker`, which gives it `client` and `_cost_row_locks`, a
    `RunLocks`): events and cost rows."""

    async def _account(
        self, record: PodRecord, reason: str, logger: Any, event: str = "ow.pod.terminated", **payload: Any
    ) -> None:
        """The run's time on the pod ends (the pod deleted, or handed over): its event and its cost row."""
        seconds = max(0.0, time.time() - record.created_at)
        cost = record.price_per_hour * seconds / 3600
        self._emit(event, record, billed_seconds=round(seconds, 1), cost_usd=round(cost, 6), reason=reason, **payload)
        try:  # two pods of one run ending at once: each row goes into the table the other wrote
            async with self._cost_row_locks.hold(record.flow_run_id):
                await _add_cost_row(self.client, record, seconds, cost, reason)
        except Exception:
            logger.warning("Could not write the cost artifact", exc_info=True)

    def _emit(self, event: str, record: PodRecord, **payload: Any) -> None:
        pool = [pool_resource(self._work_pool.id)] if self._work_pool is not None else []  # the daily budget's ledger
        emit_event(
            event=event,
            resource=record.event_resource(),
            related=[*record.related(), *pool],
            payload={**record.payload(), **payload},
        )

    def _cost_capped(self, max_cost: float | None, record: PodRecord) -> Any:
        """The CostCapped state of a pod whose price × time since its create reached `max_cost`, or None."""
        if not max_cost or record.cost_so_far() < max_cost:
            return None
        message = (
            f"The run reached max_cost (${max_cost:g}): ${record.cost_so_far():.4f} at "
            f"${record.price_per_hour:.2f}/h since pod {record.pod_id} was created; pod deleted."
        )
        return Failed(name="CostCapped", message=message)


async def _add_cost_row(client: Any, record: PodRecord, seconds: float, cost: float, reason: str) -> None:
    """Append this pod to the run's cost table (key `runpod-cost-<flow run id>`), keeping earlier attempts."""
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    key = f"runpod-cost-{record.flow_run_id}"
    previous = await client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
    )
    rows: list[dict[str, Any]] = []
    if previous and isinstance(previous[0].data, str):
        with contextlib.suppress(Exception):
            rows = [row for row in json.loads(previous[0].data) if row.get("pod") != record.pod_id]
    # Column order is what the UI shows first: at 1400 px its table has room for about 850 px, so the cost, the GPU,
    # the time and the price come before the longer text (`ended`) and the ids.
    rows.append(
        {
            "cost_usd": round(cost, 6),
            "gpu": record.gpu,  # RunPod's GPU type id, as gpu_types takes it
            "billed_seconds": round(seconds, 1),
            "usd_per_hour": round(record.price_per_hour, 4),
            "cloud": record.cloud,
            "data_center": record.pod.data_center_id or "",
            **({"warm_idle_s": round(record.warm_idle, 1)} if record.warm_idle or record.handed_from else {}),
            "ended": reason if record.handed_from is None else f"{reason} (handed over from {record.handed_from})",
            "pod": record.pod_id,
            "attempt": len(rows) + 1,
        }
    )
    total = sum(row["cost_usd"] for row in rows)
    description = (
        f"**RunPod cost: ${total:.4f}** over {len(rows)} pod{'s' if len(rows) > 1 else ''} "
        "(price per hour × time from create, or hand-over, to delete, or hand-over)."
    )
    await client.create_artifact(
        ArtifactCreate(
            key=key, type="table", data=json.dumps(rows), description=description, flow_run_id=record.flow_run_id
        )
    )


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

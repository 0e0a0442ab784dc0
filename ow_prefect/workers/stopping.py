"""Stopping a run at its caps: a room of the `runpod` worker (workers/runpod.py).

A run past its `max_runtime`, or whose pod reached its `max_cost` (workers/costs.py), is stopped. When its flow runs
and its job type stores a checkpoint when asked (`stops_at_checkpoint`: the fine-tunes), the worker first sets the
run's stop request (ow_prefect/costs/stop.py, a Prefect Variable) and waits up to `CHECKPOINT_GRACE_SECONDS` for the
run to end, so that a rerun resumes from the checkpoint; then the run gets its state (TimedOut, CostCapped) and the
pod is deleted. The request is deleted once the pod is gone.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
from prefect.states import Failed

from ow_prefect.costs.stop import clear_stop, request_stop
from ow_prefect.jobs.registry import get_job_type
from ow_prefect.workers.reconciler import _GONE

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

CHECKPOINT_GRACE_SECONDS = 180.0  # how long a fine-tune asked to stop may take to store its checkpoint


class CheckpointStop:
    """Stopping at a checkpoint, a mixin of `RunPodWorker` (whose `client`, `_state`, `_poll` and `_stopping` it
    uses)."""

    async def _stop(self, flow_run: FlowRun, reason: str, state: Any, flow_started: bool, logger: Any) -> Any:
        """Stop a run that passed max_runtime or max_cost: a running fine-tune is first asked to store a checkpoint
        (for up to CHECKPOINT_GRACE_SECONDS), so that a rerun resumes. Returns the state to end the run with."""
        if flow_started and await self._stops_at_checkpoint(flow_run.id):
            logger.info(f"{reason}: asking the run to store a checkpoint before its pod is deleted")
            self._stopping.add(flow_run.id)
            await request_stop(flow_run.id, state.message)
            end = time.monotonic() + CHECKPOINT_GRACE_SECONDS
            while time.monotonic() < end:
                current = await self._state(flow_run.id, logger)
                if current is _GONE or (current is not None and current.is_final()):
                    if current is not _GONE and current.message:
                        state = Failed(name=state.name, message=f"{state.message} {current.message}")
                    break
                await anyio.sleep(self._poll)
        return state

    async def _stops_at_checkpoint(self, flow_run_id: UUID) -> bool:
        """Whether the run's job type saves a checkpoint when asked (its `ow-type:` tag names the type)."""
        try:
            tags = (await self.client.read_flow_run(flow_run_id)).tags
            types = [tag.partition(":")[2] for tag in tags if tag.startswith("ow-type:")]
            return any(get_job_type(name).stops_at_checkpoint for name in types)
        except Exception:  # noqa: BLE001 - an unknown type or an unreachable API: stop it without waiting
            return False

    async def _clear_stop(self, flow_run_id: UUID) -> None:
        """Delete the run's stop request once its pod is gone."""
        if flow_run_id in self._stopping:
            self._stopping.discard(flow_run_id)
            with contextlib.suppress(Exception):
                await clear_stop(flow_run_id)

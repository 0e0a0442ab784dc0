"""Asking a running flow to stop at a checkpoint: how the RunPod worker's cost cap stops a fine-tune so that a rerun
resumes instead of starting over.

The request is a Prefect Variable, `ow-stop-<flow run id>` = {"reason": ...}: the worker sets it (the pod's own
credentials can set it too, but that only stops its own run early) and deletes it when the run's pod is gone. A
fine-tune's trainer looks for it every `STOP_POLL_SECONDS` (flows/finetune/stopping.py); when it is there, the trainer
saves a checkpoint, which goes to storage as every checkpoint does, and the run fails saying so. A flow that does not
look for it is stopped by the worker after `grace` seconds all the same.
"""

from __future__ import annotations

from typing import Any

STOP_POLL_SECONDS = 10.0


def stop_variable(flow_run_id: Any) -> str:
    return f"ow-stop-{flow_run_id}"


async def request_stop(flow_run_id: Any, reason: str) -> None:
    from prefect.variables import Variable

    await Variable.aset(stop_variable(flow_run_id), {"reason": reason}, overwrite=True)


async def clear_stop(flow_run_id: Any) -> None:
    from prefect.variables import Variable

    await Variable.aunset(stop_variable(flow_run_id))


def stop_requested(flow_run_id: Any) -> str | None:
    """The reason this run was asked to stop, or None (in the flow's process)."""
    from prefect.variables import Variable

    value = Variable.get(stop_variable(flow_run_id), default=None, _sync=True)
    return str(value.get("reason") or "asked to stop") if isinstance(value, dict) else None

"""Stop at a checkpoint when asked (ow_prefect/costs/stop.py: the RunPod worker's `max_cost`): the trainer saves a
checkpoint — `CheckpointSync` stores it, so a rerun of the job resumes from it — and the run fails with the reason."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from ow_prefect.costs.stop import STOP_POLL_SECONDS, stop_requested


class StopRequested(RuntimeError):
    """The run was asked to stop; its last checkpoint is in storage."""


class StopOnRequest(TrainerCallback):
    """Looks for a stop request every `every` seconds; when there is one, makes the trainer save a checkpoint now
    and ends training with `StopRequested` once the checkpoint is saved (after `CheckpointSync`, listed before it)."""

    def __init__(self, flow_run_id: str | None, every: float = STOP_POLL_SECONDS):
        self.flow_run_id = flow_run_id
        self.every = every
        self.checked = 0.0
        self.reason: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if self.flow_run_id and self.reason is None and now - self.checked >= self.every:
            self.checked = now
            self.reason = stop_requested(self.flow_run_id)
        if self.reason:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.reason:
            raise StopRequested(
                f"Stopped at step {state.global_step} of {state.max_steps}: {self.reason}. The checkpoint of step "
                f"{state.global_step} is stored: a rerun of this job resumes from it."
            )

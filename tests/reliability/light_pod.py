"""A light pod: what `prefect flow-run execute` does to its flow run's state and nothing more, through Prefect's
REST API — Running, the work, then Completed (or Failed) — for the worker-behaviour tests and the load test.

    python tests/reliability/light_pod.py [SECONDS]

On 2 CPU cores a full `prefect flow-run execute` costs each pod seconds of CPU for Python and Prefect to start,
so hundreds of them measure Prefect's start-up, not the worker. This stand-in costs a fraction of that and keeps
what the worker sees the same: a pod whose run goes Running, then final, on the server.

Without SECONDS it does what tests/runpod_flows.py's `sleeper` does with the run's parameters: sleeps `seconds`,
fails when `fail`, stores `payload` in ow_prefect's storage. On SIGTERM with
`PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule` (what the worker sets) it puts a run that is not final
back to AwaitingRetry, as `prefect flow-run execute` does when a pod is preempted. A run tagged as a fine-tune
(`ow-type:fine_tuning`) does what a fine-tune's trainer does when the worker asks it to stop (ow_prefect/costs/stop.py):
it looks for its stop Variable while it works and, when it appears, fails saying it stored a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import httpx
import tenacity

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STOPS_AT_CHECKPOINT = "ow-type:fine_tuning"


class ServerBusy(Exception):
    """Prefect's server did not take the state now: no answer, a 5xx, or WAIT (`delay_s`: when to come back)."""

    def __init__(self, reason: str, delay_s: float | None = None):
        super().__init__(reason)
        self.delay_s = delay_s


def _wait(retry_state: tenacity.RetryCallState) -> float:
    error = retry_state.outcome.exception()
    if isinstance(error, ServerBusy) and error.delay_s is not None:
        return error.delay_s
    return tenacity.wait_random_exponential(max=10)(retry_state)


# The retry policy of ow_prefect.retry (tenacity, jittered back-off, the server's delay honoured), spelled with
# tenacity directly: importing ow_prefect would cost each pod half a second of CPU, and this pod is to stay light.
# Proposing a state is idempotent (the server answers the same for the same proposal).
@tenacity.retry(
    retry=tenacity.retry_if_exception_type(ServerBusy), wait=_wait, stop=tenacity.stop_after_attempt(30), reraise=True
)
def set_state(client: httpx.Client, flow_run_id: str, state: dict[str, Any]) -> str:
    """Propose a state; retried while the server is busy (5xx, no answer) or asks to wait. The server's answer."""
    try:
        response = client.post(f"/flow_runs/{flow_run_id}/set_state", json={"state": state})
    except httpx.TransportError as exc:
        raise ServerBusy(f"no answer: {exc}") from exc
    if response.status_code >= 500:
        raise ServerBusy(f"{response.status_code} from the server")
    response.raise_for_status()
    result = response.json()
    if result["status"] == "WAIT":
        raise ServerBusy("asked to wait", float(result["details"].get("delay_seconds") or 1))
    return result["status"]


def reschedule_on_sigterm(client: httpx.Client, flow_run_id: str) -> None:
    def handler(signum, frame):
        run = client.get(f"/flow_runs/{flow_run_id}").json()
        if (run.get("state") or {}).get("type") not in FINAL:
            set_state(client, flow_run_id, {"type": "SCHEDULED", "name": "AwaitingRetry"})
            print(f"flow run {flow_run_id} rescheduled", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, handler)


def sleep_unless_stopped(client: httpx.Client, flow_run_id: str, seconds: float) -> str | None:
    """Sleep `seconds`, looking for the run's stop Variable every half second: its reason, or None."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        response = client.get(f"/variables/name/ow-stop-{flow_run_id}")
        if response.status_code == 200:
            return (response.json().get("value") or {}).get("reason") or "asked to stop"
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    return None


def main() -> int:
    flow_run_id = os.environ["PREFECT__FLOW_RUN_ID"]
    with httpx.Client(base_url=os.environ["PREFECT_API_URL"].rstrip("/"), timeout=60) as client:
        if os.environ.get("PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR") == "reschedule":
            reschedule_on_sigterm(client, flow_run_id)
        run = client.get(f"/flow_runs/{flow_run_id}").json()
        parameters = {"seconds": float(sys.argv[1])} if len(sys.argv) > 1 else run["parameters"]
        if set_state(client, flow_run_id, {"type": "RUNNING"}) != "ACCEPT":
            print(f"flow run {flow_run_id} is not to run now", flush=True)
            return 0
        print(f"sleeping {parameters.get('seconds', 1.0)} s", flush=True)
        seconds = float(parameters.get("seconds", 1.0))
        if STOPS_AT_CHECKPOINT in run.get("tags", []):
            reason = sleep_unless_stopped(client, flow_run_id, seconds)
            if reason:
                set_state(client, flow_run_id, {"type": "FAILED", "message": f"Stopped at a checkpoint: {reason}"})
                return 1
        else:
            time.sleep(seconds)
        if parameters.get("fail"):
            set_state(client, flow_run_id, {"type": "FAILED", "message": "asked to fail"})
            return 1
        if parameters.get("payload"):
            from ow_prefect.storage import Storage

            stored = Storage.from_settings().put_bytes(parameters["payload"].encode(), "result", filename="payload.txt")
            print(f"stored {stored.id}", flush=True)
        set_state(client, flow_run_id, {"type": "COMPLETED"})
    print(f"flow run {flow_run_id} completed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

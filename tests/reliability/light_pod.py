"""The load test's pod (tests/reliability/test_load.py, OW_LOAD_POD=light): what `prefect flow-run execute`
does to its flow run's state and nothing more — Running, a short sleep, Completed — through Prefect's REST API.

On 2 CPU cores a full `prefect flow-run execute` costs each pod seconds of CPU for Python and Prefect to start,
so 200 of them take half an hour and measure Prefect's start-up, not the worker. This stand-in costs a fraction
of that and keeps what the worker sees the same: a pod whose run goes Running, then Completed, on the server.
"""

from __future__ import annotations

import os
import sys
import time

import httpx


def set_state(client: httpx.Client, flow_run_id: str, state_type: str) -> None:
    """Propose a state; retry while the server is busy (5xx, no answer) or asks to wait."""
    for attempt in range(30):
        try:
            response = client.post(f"/flow_runs/{flow_run_id}/set_state", json={"state": {"type": state_type}})
        except httpx.TransportError:
            time.sleep(min(2**attempt, 10))
            continue
        if response.status_code >= 500:
            time.sleep(min(2**attempt, 10))
            continue
        response.raise_for_status()
        result = response.json()
        if result["status"] == "ACCEPT":
            return
        if result["status"] == "WAIT":
            time.sleep(float(result["details"].get("delay_seconds") or 1))
            continue
        raise SystemExit(f"{state_type} refused: {result}")
    raise SystemExit(f"could not set {state_type}: the server kept failing")


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    flow_run_id = os.environ["PREFECT__FLOW_RUN_ID"]
    with httpx.Client(base_url=os.environ["PREFECT_API_URL"].rstrip("/"), timeout=60) as client:
        set_state(client, flow_run_id, "RUNNING")
        time.sleep(seconds)
        set_state(client, flow_run_id, "COMPLETED")
    print(f"flow run {flow_run_id} completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

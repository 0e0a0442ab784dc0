"""Is this pod's flow run already over? What docker/entrypoint.sh asks before it starts the flow.

    python -m ow_prefect.runpod.run_state    # exit 0: the run is final (do not run it); 1: run it

RunPod restarts a container whose command exited, and the worker deletes a pod only after it saw the run end
(seconds later on a busy API, longer with rate limits). A restarted `prefect flow-run execute` would propose
Running to a run that already Completed — Prefect accepts that when no result was persisted — and run the flow
again; the worker's delete then sends SIGTERM, which reschedules the now-running run: a second pod, billed, for
work that was done. So a restarted pod whose run is final stays idle until the worker deletes it.

It reads `PREFECT__FLOW_RUN_ID`, `PREFECT_API_URL` and the credentials the worker gives pods
(`PREFECT_API_KEY` or `PREFECT_API_AUTH_STRING`; `PREFECT_API_TLS_INSECURE_SKIP_VERIFY`) through httpx, and
nothing of Prefect's client (it runs on every pod start). Anything it cannot tell (no run id, no answer, an
error) means "run it", as before. The warm pod's agent (ow_prefect/runpod/agent.py) reads the API the same way.
"""

from __future__ import annotations

import base64
import os
import sys
from typing import Any

FINAL_TYPES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


def prefect_api() -> Any:
    """An httpx client on the pod's Prefect API with the credentials the worker gave the pod, or None."""
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return None
    import httpx

    headers = {}
    if key := os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    elif auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    verify = os.environ.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").lower() not in ("1", "true")
    return httpx.Client(base_url=api.rstrip("/"), headers=headers, verify=verify, timeout=10)


def state_type(client: Any, flow_run_id: str) -> str | None:
    """The run's state type (COMPLETED, PENDING, ...), or None when the API does not say."""
    import httpx

    try:
        response = client.get(f"/flow_runs/{flow_run_id}")
        response.raise_for_status()
        return ((response.json().get("state") or {}).get("type") or "").upper() or None
    except (httpx.HTTPError, ValueError):
        return None


def final_state() -> str | None:
    """The run's final state type, or None (not final, or not known)."""
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    client = prefect_api()
    if not run_id or client is None:
        return None
    with client:
        found = state_type(client, run_id)
    return found if found in FINAL_TYPES else None


def main() -> int:
    found = final_state()
    if found is None:
        return 1
    print(f"flow run {os.environ['PREFECT__FLOW_RUN_ID']} is already {found}: not running it again", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

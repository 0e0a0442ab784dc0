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
error) means "run it", as before.
"""

from __future__ import annotations

import base64
import os
import sys

FINAL_TYPES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


def final_state() -> str | None:
    """The run's final state type, or None (not final, or not known)."""
    run_id, api = os.environ.get("PREFECT__FLOW_RUN_ID"), os.environ.get("PREFECT_API_URL")
    if not run_id or not api:
        return None
    import httpx

    headers = {}
    if key := os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    elif auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    verify = os.environ.get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "").lower() not in ("1", "true")
    try:
        response = httpx.get(f"{api.rstrip('/')}/flow_runs/{run_id}", headers=headers, verify=verify, timeout=10)
        response.raise_for_status()
        state_type = ((response.json().get("state") or {}).get("type") or "").upper()
    except (httpx.HTTPError, ValueError):
        return None
    return state_type if state_type in FINAL_TYPES else None


def main() -> int:
    state_type = final_state()
    if state_type is None:
        return 1
    print(f"flow run {os.environ['PREFECT__FLOW_RUN_ID']} is already {state_type}: not running it again", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

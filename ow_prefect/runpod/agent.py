"""The warm pod's agent: runs the flow run it is assigned, then the next one the worker hands it, on one pod.

    python -m ow_prefect.runpod.agent [COMMAND ...]     # docker/entrypoint.sh, when OW_KEEP_WARM_SECONDS > 0

A pod the worker created with `keep_warm_seconds` > 0 (ow_prefect/workers/handoff.py) runs this instead of its
command. The agent runs COMMAND (default `prefect flow-run execute`) with `PREFECT__FLOW_RUN_ID` set to its
current run: first the run of the pod's env, or, after a container restart, the run its assignment names. When
the command ends:

- its run is not final (the process crashed, or was rescheduled): the agent exits with the command's code, so the
  container exits as it did without the agent and the worker sees it (a crash, a reschedule);
- its run is final: the agent waits for its next assignment, the Prefect Variable `ow-pod-<pod id>` that only the
  worker writes, after it claimed the next run (Pending, through the worker's normal submission) and checked that
  it fits this pod. A new flow run id there is the next run; the agent runs it only if it is Pending or Running
  (a run cancelled while it was handed over is not started). Past the assignment's `warm_until` (or, before
  the worker wrote one, `OW_KEEP_WARM_SECONDS`) it stops asking and idles until the worker deletes the pod.

The agent only reads: it never writes an assignment or a state. It uses the API URL and the credentials the
worker gave the pod (nothing more than before), through httpx, without importing Prefect. SIGTERM (a delete, a
preemption) goes to the running command, whose own handler reschedules its run as before; the command dies
with the agent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from ow_prefect.runpod.run_state import FINAL_TYPES, prefect_api, state_type

ASSIGNMENT_PREFIX = "ow-pod-"
KEEP_WARM_ENV = "OW_KEEP_WARM_SECONDS"
POLL_SECONDS = 1.0  # OW_AGENT_POLL_SECONDS (a job's `env`) changes it
WRITE_GRACE_SECONDS = 30.0  # how long past its warm time the agent still looks (the worker's write may lag)
RUNNABLE = frozenset({"PENDING", "RUNNING"})
DEFAULT_COMMAND = ["prefect", "flow-run", "execute"]


def assignment_variable(pod_id: str) -> str:
    """The name of a pod's assignment Variable (Prefect's variable names are lower case)."""
    return f"{ASSIGNMENT_PREFIX}{pod_id.lower()}"


def read_assignment(client: Any, pod_id: str) -> dict[str, Any] | None:
    """The pod's assignment ({"flow_run_id", "warm_until", ...}), or None: none, unreadable, or not one of ours."""
    import httpx

    try:
        response = client.get(f"/variables/name/{assignment_variable(pod_id)}")
        if response.status_code != 200:
            return None
        value = response.json().get("value")
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    try:
        value["flow_run_id"] = str(uuid.UUID(str(value.get("flow_run_id"))))
    except ValueError:
        return None
    pool = os.environ.get("OW_WORK_POOL_ID")
    if pool and value.get("work_pool_id") not in (None, pool):
        return None
    return value


class Agent:
    def __init__(self, command: list[str], client: Any, pod_id: str) -> None:
        self.command = command
        self.client = client
        self.pod_id = pod_id
        self.child: subprocess.Popen | None = None
        self.terminated = False

    def on_sigterm(self, signum: int, frame: Any) -> None:
        """Pass the signal to the running command (its handler reschedules its run); without one, exit."""
        self.terminated = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child.pid, signal.SIGTERM)
            return
        os._exit(0)

    def run(self, flow_run_id: str) -> int:
        env = {**os.environ, "PREFECT__FLOW_RUN_ID": flow_run_id}
        print(f"agent: running flow run {flow_run_id}", flush=True)
        self.child = subprocess.Popen(self.command, env=env, preexec_fn=_child_setup)  # noqa: PLW1509
        code = self.child.wait()
        self.child = None
        return code

    def next_run(self, current: str) -> str | None:
        """Wait for an assignment naming another flow run; None once the pod's warm time is over."""
        fallback = float(os.environ.get(KEEP_WARM_ENV) or 0)
        deadline = time.time() + fallback + WRITE_GRACE_SECONDS
        while not self.terminated:
            assignment = read_assignment(self.client, self.pod_id) if self.pod_id else None
            if assignment is not None:
                if assignment["flow_run_id"] != current:
                    return assignment["flow_run_id"]
                if isinstance(assignment.get("warm_until"), int | float):
                    deadline = float(assignment["warm_until"]) + WRITE_GRACE_SECONDS
            if time.time() > deadline:
                return None
            time.sleep(float(os.environ.get("OW_AGENT_POLL_SECONDS") or POLL_SECONDS))
        return None

    def loop(self, flow_run_id: str) -> int:
        while True:
            found = state_type(self.client, flow_run_id)
            if found is None or found in RUNNABLE:  # None: the API does not say; run it, as without the agent
                code = self.run(flow_run_id)
                if self.terminated:
                    return code
                if state_type(self.client, flow_run_id) not in FINAL_TYPES:
                    print(f"agent: flow run {flow_run_id} is not over after its command (exit {code})", flush=True)
                    return code
            else:
                print(f"agent: flow run {flow_run_id} is {found}: not running it", flush=True)
            following = self.next_run(flow_run_id)
            if following is None:
                print("agent: no next flow run; idle until the worker deletes the pod", flush=True)
                while True:
                    signal.pause()
            flow_run_id = following


def _child_setup() -> None:
    """In the command's process: a process group of its own (the agent forwards SIGTERM to it) that dies with the
    agent (Linux's PR_SET_PDEATHSIG)."""
    os.setpgid(0, 0)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv) or DEFAULT_COMMAND
    client = prefect_api()
    pod_id = os.environ.get("RUNPOD_POD_ID", "")
    assignment = read_assignment(client, pod_id) if client is not None and pod_id else None
    flow_run_id = assignment["flow_run_id"] if assignment else os.environ.get("PREFECT__FLOW_RUN_ID", "")
    if client is None or not flow_run_id:  # nothing to ask: run the command once, as without the agent
        os.execvp(command[0], command)
    agent = Agent(command, client, pod_id)
    signal.signal(signal.SIGTERM, agent.on_sigterm)
    return agent.loop(flow_run_id)


if __name__ == "__main__":
    sys.exit(main())

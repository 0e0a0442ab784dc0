"""A restarted pod whose flow run is already over does not run it again (ow_prefect/runpod/run_state.py, run by
docker/entrypoint.sh): RunPod restarts a container whose command exited, before the worker's delete lands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture
def flow_run(use_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    @flow(name="run-state-check")
    def noop():
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(noop)

        def set_final():
            client.set_flow_run_state(run.id, Completed(), force=True)

        yield run, set_final


def pod_env(flow_run_id, api: str) -> dict[str, str]:
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/root"),
        "PREFECT__FLOW_RUN_ID": str(flow_run_id),
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": "user:secret",  # what the worker gives pods; the test server ignores it
    }


def entrypoint(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess | None:
    """docker/entrypoint.sh with `echo the flow runs` as the pod's command; None when it stayed up (idle)."""
    try:
        return subprocess.run(
            ["bash", str(ROOT / "docker" / "entrypoint.sh"), "echo", "the flow runs"],
            env={**env, "HF_HOME": str(cwd / "hf")},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired as stayed:
        return subprocess.CompletedProcess(stayed.cmd, None, stayed.stdout or b"", stayed.stderr or b"")


def test_a_pod_whose_run_is_over_stays_idle_and_runs_nothing(flow_run, prefect_api, tmp_path):
    run, set_final = flow_run
    env = pod_env(run.id, prefect_api)
    first = entrypoint(env, tmp_path)  # the run is Scheduled: its pod runs the command
    assert first.returncode == 0 and "the flow runs" in first.stdout, first.stderr

    set_final()
    restarted = entrypoint(env, tmp_path)  # RunPod restarted the container after the run completed
    assert restarted.returncode is None, "the container should stay up until the worker deletes it"
    out = restarted.stdout.decode() if isinstance(restarted.stdout, bytes) else restarted.stdout
    assert "the flow runs" not in out
    assert f"flow run {run.id} is already COMPLETED: not running it again" in out


def test_anything_it_cannot_tell_means_run_it(tmp_path):
    checks = {
        "no run id": {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
        "no answer": {
            "PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-000000000000",
            "PREFECT_API_URL": "http://127.0.0.1:9/api",
        },
    }
    for what, extra in checks.items():
        env = {"PATH": os.environ["PATH"], **extra}
        done = subprocess.run(
            [sys.executable, "-m", "ow_prefect.runpod.run_state"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, (what, done.stdout, done.stderr)

"""The `runpod` worker end to end: a real Prefect server, the worker as a process (`prefect worker start
--type runpod`, shared by the session: tests/runpod_support.py), and FakeRunPod, whose pods run `prefect flow-run
execute` as local processes (or a light stand-in where only the worker's side is tested). The fault
scenarios (capacity, API errors, crashes, preemption, cancellation, lost workers, ...) are in tests/reliability/."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import EVENT_SECONDS, eventually
from tests.runpod_support import API_KEY, AUTH_STRING, POD_COMMAND, all_deleted, finished, pods_of, run_logs, wait_for

pytestmark = pytest.mark.slow


def test_pool_type_is_registered_with_prefect(prefect_api):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    created = subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "create", "gpu-cli", "--type", "runpod"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "inspect", "gpu-cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "type='runpod'" in shown.stdout
    for variable in ("gpu_types", "min_vram_gb", "max_runtime", "startup_timeout", "credentials", "cloud"):
        assert variable in shown.stdout


def test_a_run_gets_its_own_pod_which_is_deleted_when_it_completes(prefect_client, fake, start_run, runpod_worker_log):
    flow_run = start_run(seconds=1, command=POD_COMMAND)  # end to end: a real `prefect flow-run execute` in the pod
    done = wait_for(prefect_client, flow_run.id, finished)
    assert done.state.is_completed(), done.state
    assert all_deleted(fake, flow_run.id)
    (pod,) = pods_of(fake, flow_run.id)
    assert done.infrastructure_pid == f"runpod::{pod.id}"
    # the cheapest type with >= 20 GB in SECURE (the pool's default cloud): an RTX A6000 at $0.49/h
    assert pod.gpu == {"id": "NVIDIA RTX A6000", "count": 1} and pod.cloud == "SECURE"
    # only what the run needs: no PREFECT_HOME, no database URL, no worker settings
    assert set(pod.env) == {
        "PREFECT_API_URL",
        "PREFECT_API_AUTH_STRING",
        "PREFECT__FLOW_RUN_ID",
        "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR",
        "OW_WORK_POOL_ID",
        "OW_POD_DEADLINE",
        "OW_HEALTH_EXPECT",  # what it rented, for the GPU health check (ow_prefect/runpod/health.py)
    }
    assert pod.env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert pod.args == POD_COMMAND

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    def cost():
        found = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"runpod-cost-{flow_run.id}"]))
        )
        return found and json.loads(found[0].data)

    (row,) = eventually(cost)
    assert row["pod"] == pod.id and row["usd_per_hour"] == 0.49 and row["cost_usd"] > 0
    assert row["gpu"] == "1x NVIDIA RTX A6000"
    # the UI's table shows the columns in this order and, at 1400 px, about 850 px of them: the cost first
    assert list(row)[:4] == ["cost_usd", "gpu", "billed_seconds", "usd_per_hour"], list(row)

    events = eventually(lambda: _pod_events(prefect_client, pod.id, 4), timeout=EVENT_SECONDS)
    assert [e.event for e in events] == ["ow.pod.created", "ow.pod.running", "ow.pod.healthy", "ow.pod.terminated"]
    assert events[0].related[0].id == f"prefect.flow-run.{flow_run.id}"
    assert events[2].payload["ok"] is True and events[2].payload["driver"] == "570.124.06"  # its GPU health report
    assert events[3].payload["price_per_hour"] == 0.49 and events[3].payload["cost_usd"] > 0

    logs = runpod_worker_log.read_text() + run_logs(prefect_client, flow_run.id)
    assert "Creating pod 1/" in logs and "NVIDIA RTX A6000" in logs
    for secret in (API_KEY, AUTH_STRING):
        assert secret not in logs
        assert all(secret not in p.name for p in fake.pods.values())


def _pod_events(prefect_client, pod_id, count):
    from prefect.events.filters import EventFilter, EventResourceFilter

    page = prefect_client.read_events(
        filter=EventFilter(resource=EventResourceFilter(id=[f"runpod.pod.{pod_id}"])), limit=50
    )
    events = sorted(page.events, key=lambda e: e.occurred)
    return events if len(events) >= count else None


def test_max_runtime_is_enforced(prefect_client, fake, start_run):
    flow_run = start_run(seconds=120, max_runtime=12)
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_failed() and done.state.name == "TimedOut", done.state
    assert "max_runtime (12 s)" in done.state.message
    assert all_deleted(fake, flow_run.id)


def test_blocks_command_saves_the_key_and_sets_up_the_pool(prefect_api, prefect_client):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RUNPOD_API_KEY": "rpa_cli_secret_123"}
    command = [sys.executable, "-m", "blocks.runpod", "--name", "rp-cli", "--pool", "gpu-blocks"]
    first = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "'gpu-blocks' created" in first.stdout and "'gpu-blocks' updated" in again.stdout
    assert "rpa_cli_secret_123" not in first.stdout + first.stderr + again.stdout + again.stderr
    pool = prefect_client.read_work_pool("gpu-blocks")
    block = prefect_client.read_block_document_by_name("rp-cli", "runpod-credentials")
    default = pool.base_job_template["variables"]["properties"]["credentials"]["default"]
    assert pool.type == "runpod" and default == {"$ref": {"block_document_id": str(block.id)}}


@pytest.mark.parametrize(
    "job_variables, message",
    [
        ({"ports": ["8000"]}, "'<port>/http' or '<port>/tcp'"),
        ({"gpu_types": ["NVIDIA RTX 9999"]}, "not RunPod GPU type ids"),
    ],
)
def test_bad_job_variables_crash_the_run_before_any_pod_exists(prefect_client, fake, start_run, job_variables, message):
    flow_run = start_run(**job_variables)
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed() and message in done.state.message, done.state
    assert not pods_of(fake, flow_run.id)


def test_a_cuda_floor_that_removes_every_candidate_says_so(prefect_client, fake, start_run, runpod_worker_log):
    # every host of the fake reports CUDA 12.8; the pool asks for >= 20 GB in SECURE, which four types have
    log_before = runpod_worker_log.read_text() if runpod_worker_log.exists() else ""  # the module's worker
    flow_run = start_run(min_cuda_version="13.0")
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_failed() and done.state.name == "NoCapacity", done.state
    message = done.state.message
    assert "4 without a free host at the CUDA floor (host CUDA >= 13.0)" in message, message
    assert "lower min_cuda_version" in message and not pods_of(fake, flow_run.id)

    def this_runs_log() -> str:  # what the worker logged since this test started (earlier tests' lines left out)
        text = runpod_worker_log.read_text()[len(log_before) :]
        return "NoCapacity" in text and text

    worker_log = eventually(this_runs_log)
    assert "NoCapacity: No RunPod GPU fits" in worker_log and "Traceback" not in worker_log, worker_log[-3000:]


def test_a_pod_without_the_code_crashes_the_run_with_the_pull_steps_error(
    prefect_client, fake, runpod_pool, runpod_worker
):
    """The pull step fails in the pod (no /opt/ow_prefect and no OW_POD_CODE_DIR, as on an image without the
    code): the run's state message and logs carry the pod's last lines, the pull step's error among them."""
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(ROOT / "tests/runpod_flows.py:sleeper"))
    deployment_id = prefect_client.create_deployment(
        flow_id=prefect_client.create_flow_from_name(flow.name),
        name="no-code-in-the-pod",
        entrypoint="tests/runpod_flows.py:sleeper",
        work_pool_name=runpod_pool,
        parameter_openapi_schema=flow.parameters.model_dump(mode="json"),
        pull_steps=[{"ow_prefect.workers.pull.code_directory": {}}],
        job_variables={"command": POD_COMMAND},  # a real `prefect flow-run execute`, which runs the pull steps
    )
    flow_run = prefect_client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": 1})
    wait_for(prefect_client, flow_run.id, finished, timeout=120)
    assert all_deleted(fake, flow_run.id, timeout=60)
    # Prefect's own crash says only "Process exited with status code: 1"; the worker then adds the pod's log
    done = wait_for(prefect_client, flow_run.id, lambda run: "code is not in this pod" in (run.state.message or ""), 60)
    assert done.state.is_crashed(), done.state
    assert "The error: FileNotFoundError: ow_prefect's code is not in this pod" in done.state.message, done.state
    assert "OW_POD_CODE_DIR" in done.state.message
    logs = eventually(lambda: "code is not in this pod" in run_logs(prefect_client, flow_run.id), timeout=30)
    assert logs, run_logs(prefect_client, flow_run.id)[-3000:]  # the worker's log lines reach the API in batches

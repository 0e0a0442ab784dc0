"""The `runpod` worker end to end: a real Prefect server, the worker as a process (`prefect worker start
--type runpod`), and FakeRunPod, whose pods run `prefect flow-run execute` as local processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ow_prefect.testing.fake_runpod import CAPACITY_DETAIL, FakeRunPod
from ow_prefect.testing.servers import prefect_worker
from tests.conftest import ROOT
from tests.helpers import eventually

pytestmark = pytest.mark.slow

POOL = "ow-test-runpod"
API_KEY = "rp-test-key-7f3a9c2e5b"
AUTH_STRING = "prefect-auth-secret-41d8"
POD_COMMAND = f"{sys.executable} -m prefect flow-run execute"
WORKER_ENV = {
    "OW_RUNPOD_POLL_SECONDS": "0.5",
    "OW_RUNPOD_RECONCILE_SECONDS": "2",
    "PREFECT_API_AUTH_STRING": AUTH_STRING,  # the test server ignores it; it must reach pods and nothing else
}


@pytest.fixture(scope="module")
def fake():
    with FakeRunPod(api_key=API_KEY, boot_seconds=0.3, restart_backoff=0.5, kill_grace=2, log_follow_seconds=0.3) as f:
        yield f


@pytest.fixture(scope="module")
def client(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        yield c


def make_pool(client, fake, name):
    """A `runpod` pool whose credentials block points at the fake and whose pods run this interpreter."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.workers.runpod import RunPodWorker

    block_id = RunPodCredentials(api_key=fake.api_key, api_url=fake.url).save(name, overwrite=True, _sync=True)
    template = RunPodWorker.base_job_template(block_id, command=POD_COMMAND, min_vram_gb=20)
    client.create_work_pool(WorkPoolCreate(name=name, type="runpod", base_job_template=template), overwrite=True)


def deploy(client, pool, name, **job_variables):
    from prefect.flows import load_flow_from_entrypoint

    entrypoint = "tests/runpod_flows.py:sleeper"
    flow = load_flow_from_entrypoint(str(ROOT / entrypoint))
    return client.create_deployment(
        flow_id=client.create_flow_from_name(flow.name),
        name=name,
        entrypoint=entrypoint,
        work_pool_name=pool,
        job_variables=job_variables,
        parameter_openapi_schema=flow.parameters.model_dump(mode="json"),
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
    )


@pytest.fixture(scope="module")
def pool(client, fake):
    make_pool(client, fake, POOL)
    return POOL


@pytest.fixture(scope="module")
def worker_log(tmp_path_factory):
    return tmp_path_factory.mktemp("runpod-worker") / "worker.log"


@pytest.fixture(scope="module")
def runpod_worker(prefect_api, pool, worker_log):
    with prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, worker_log) as proc:
        yield proc


@pytest.fixture
def run(client, pool, runpod_worker, request):
    """Deploy the sleeper with job variables and start a run: run(seconds=..., **job_variables) -> flow run."""

    def start(seconds=1.0, fail=False, **job_variables):
        deployment_id = deploy(client, pool, f"{request.node.name[:40]}-{len(job_variables)}", **job_variables)
        return client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": seconds, "fail": fail})

    return start


def pods_of(fake, flow_run_id):
    return [pod for pod in fake.pods.values() if pod.name == f"ow-{flow_run_id}"]


def wait_for(client, flow_run_id, check, timeout=90):
    final = eventually(lambda: check(client.read_flow_run(flow_run_id)), timeout=timeout, interval=0.3)
    assert final, f"flow run {flow_run_id} is {client.read_flow_run(flow_run_id).state}"
    return client.read_flow_run(flow_run_id)


def finished(flow_run):
    return flow_run.state.is_final()


def all_deleted(fake, flow_run_id, timeout=20):
    return eventually(
        lambda: pods_of(fake, flow_run_id) and all(p.deleted_at for p in pods_of(fake, flow_run_id)), timeout=timeout
    )


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


def test_a_run_gets_its_own_pod_which_is_deleted_when_it_completes(client, fake, run, worker_log):
    flow_run = run(seconds=1)
    done = wait_for(client, flow_run.id, finished)
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
    }
    assert pod.env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert pod.args == POD_COMMAND

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    def cost():
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"runpod-cost-{flow_run.id}"]))
        )
        return found and json.loads(found[0].data)

    (row,) = eventually(cost)
    assert row["pod"] == pod.id and row["usd_per_hour"] == 0.49 and row["cost_usd"] > 0
    assert row["gpu"] == "1x NVIDIA RTX A6000"

    events = eventually(lambda: _pod_events(client, pod.id, 3), timeout=30)
    assert [e.event for e in events] == ["ow.pod.created", "ow.pod.running", "ow.pod.terminated"]
    assert events[0].related[0].id == f"prefect.flow-run.{flow_run.id}"
    assert events[2].payload["price_per_hour"] == 0.49 and events[2].payload["cost_usd"] > 0

    logs = worker_log.read_text() + "\n".join(log.message for log in _logs(client, flow_run.id))
    assert "Creating pod 1/" in logs and "NVIDIA RTX A6000" in logs
    for secret in (API_KEY, AUTH_STRING):
        assert secret not in logs
        assert all(secret not in p.name for p in fake.pods.values())


def _pod_events(client, pod_id, count):
    from prefect.events.filters import EventFilter, EventResourceFilter

    page = client.read_events(filter=EventFilter(resource=EventResourceFilter(id=[f"runpod.pod.{pod_id}"])), limit=50)
    events = sorted(page.events, key=lambda e: e.occurred)
    return events if len(events) >= count else None


def _logs(client, flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def cancel(client, flow_run_id):
    from prefect.states import Cancelling

    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)


def test_cancelled_while_the_pod_boots(client, fake, run):
    flow_run = run(command=f"sleep 60; {POD_COMMAND}")  # an image that takes a minute to pull and start
    assert eventually(lambda: pods_of(fake, flow_run.id), timeout=30)
    cancel(client, flow_run.id)
    cancelled_at = time.monotonic()
    assert all_deleted(fake, flow_run.id, timeout=15)
    assert time.monotonic() - cancelled_at < 10
    assert wait_for(client, flow_run.id, finished, timeout=30).state.is_cancelled()


def test_cancelled_while_running(client, fake, run):
    flow_run = run(seconds=120)
    wait_for(client, flow_run.id, lambda fr: fr.state.is_running())
    cancel(client, flow_run.id)
    cancelled_at = time.monotonic()
    assert all_deleted(fake, flow_run.id, timeout=20)
    assert time.monotonic() - cancelled_at < 15
    assert wait_for(client, flow_run.id, finished, timeout=30).state.is_cancelled()


def test_capacity_errors_move_on_to_the_next_candidate(client, fake, run, worker_log):
    # The catalog lists these as available, but the first two creates answer RunPod's capacity 400.
    fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=2)
    flow_run = run(seconds=0.5, cloud="ANY")
    done = wait_for(client, flow_run.id, finished)
    assert done.state.is_completed(), done.state
    (pod,) = pods_of(fake, flow_run.id)
    # ANY, cheapest first: A6000 COMMUNITY $0.33 and RTX 4090 COMMUNITY $0.34 had none; A6000 SECURE $0.49 next
    assert (pod.gpu["id"], pod.cloud) == ("NVIDIA RTX A6000", "SECURE")
    messages = "\n".join(log.message for log in _logs(client, flow_run.id))
    assert messages.count("No capacity for") == 2 and "Creating pod 3/" in messages


def test_no_capacity_anywhere_fails_naming_what_was_tried(client, fake, run):
    fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=2)
    flow_run = run(gpu_types=["NVIDIA RTX A6000", "NVIDIA A100 80GB PCIe"])
    done = wait_for(client, flow_run.id, finished)
    assert done.state.is_failed() and done.state.name == "NoCapacity"
    assert "RTX A6000" in done.state.message and "A100 80GB PCIe" in done.state.message
    assert not pods_of(fake, flow_run.id)


def test_with_capacity_wait_the_worker_retries_until_a_gpu_frees_up(client, fake, run):
    fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=1)
    flow_run = run(seconds=0.5, gpu_types=["NVIDIA RTX A6000"], capacity_wait=60)
    assert wait_for(client, flow_run.id, finished).state.is_completed()
    messages = "\n".join(log.message for log in _logs(client, flow_run.id))
    assert "No candidate has capacity; trying again in 5 s" in messages
    assert len(pods_of(fake, flow_run.id)) == 1


def test_a_lost_create_response_makes_no_second_pod(client, fake, run):
    fake.inject("POST", r"/pods$", lose_response=True)
    flow_run = run(seconds=0.5)
    assert wait_for(client, flow_run.id, finished).state.is_completed()
    assert len(pods_of(fake, flow_run.id)) == 1
    assert all_deleted(fake, flow_run.id)


def test_max_runtime_is_enforced(client, fake, run):
    flow_run = run(seconds=120, max_runtime=12)
    done = wait_for(client, flow_run.id, finished, timeout=60)
    assert done.state.is_failed() and done.state.name == "TimedOut", done.state
    assert "max_runtime (12 s)" in done.state.message
    assert all_deleted(fake, flow_run.id)


def test_a_crash_looping_container_crashes_the_run_with_its_last_lines(client, fake, run):
    flow_run = run(command="echo 'cannot import flows: boom-marker' >&2; exit 3")
    done = wait_for(client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed(), done.state
    assert "container exited before the flow run finished" in done.state.message
    assert "boom-marker" in done.state.message
    assert all_deleted(fake, flow_run.id)


def test_startup_timeout(client, fake, run):
    flow_run = run(command="sleep 600", startup_timeout=4)
    done = wait_for(client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed() and "startup_timeout (4 s)" in done.state.message
    assert all_deleted(fake, flow_run.id)


def test_a_preempted_pod_reschedules_the_run_onto_a_new_pod(client, fake, run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    flow_run = run(seconds=6)
    wait_for(client, flow_run.id, lambda fr: fr.state.is_running())
    (first,) = pods_of(fake, flow_run.id)
    time.sleep(1)
    fake.preempt(first.id)
    done = wait_for(client, flow_run.id, finished, timeout=120)
    assert done.state.is_completed() and done.run_count == 2, done.state
    assert all_deleted(fake, flow_run.id)
    pods = pods_of(fake, flow_run.id)
    assert len(pods) == 2

    def rows():
        key = f"runpod-cost-{flow_run.id}"
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        data = max(found, key=lambda a: a.created).data if found else "[]"
        return len(json.loads(data)) == 2 and json.loads(data)

    table = eventually(rows)
    assert table and [row["pod"] for row in table] == [p.id for p in pods]


def test_a_restarted_worker_deletes_the_pod_its_predecessor_left(client, fake, prefect_api, tmp_path):
    pool = "ow-test-runpod-restart"
    make_pool(client, fake, pool)
    deployment_id = deploy(client, pool, "restart")
    flow_run = client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": 3})
    with prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, tmp_path / "first.log") as first:
        wait_for(client, flow_run.id, lambda fr: fr.state.is_running())
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (pod,) = pods_of(fake, flow_run.id)
    assert wait_for(client, flow_run.id, finished).state.is_completed()
    # nobody deletes it: RunPod restarts its container and bills on (the restart takes a while on a loaded machine)
    assert eventually(lambda: pod.restarts >= 1, timeout=60) and pod.deleted_at is None
    with prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, tmp_path / "second.log"):
        assert eventually(lambda: pod.deleted_at, timeout=30)
    assert "Reconciler: deleting pod" in (tmp_path / "second.log").read_text()


def test_blocks_command_saves_the_key_and_sets_up_the_pool(prefect_api, client):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "RUNPOD_API_KEY": "rpa_cli_secret_123"}
    command = [sys.executable, "-m", "blocks.runpod", "--name", "rp-cli", "--pool", "gpu-blocks"]
    first = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    again = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "'gpu-blocks' created" in first.stdout and "'gpu-blocks' updated" in again.stdout
    assert "rpa_cli_secret_123" not in first.stdout + first.stderr + again.stdout + again.stderr
    pool = client.read_work_pool("gpu-blocks")
    block = client.read_block_document_by_name("rp-cli", "runpod-credentials")
    default = pool.base_job_template["variables"]["properties"]["credentials"]["default"]
    assert pool.type == "runpod" and default == {"$ref": {"block_document_id": str(block.id)}}


@pytest.mark.parametrize(
    "job_variables, message",
    [
        ({"ports": ["8000"]}, "'<port>/http' or '<port>/tcp'"),
        ({"gpu_types": ["NVIDIA RTX 9999"]}, "not RunPod GPU type ids"),
    ],
)
def test_bad_job_variables_crash_the_run_before_any_pod_exists(client, fake, run, job_variables, message):
    flow_run = run(**job_variables)
    done = wait_for(client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed() and message in done.state.message, done.state
    assert not pods_of(fake, flow_run.id)

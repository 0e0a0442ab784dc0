"""Fault scenarios of the `runpod` worker: a real Prefect server, the worker as a process and FakeRunPod, whose pods
are light (tests/reliability/light_pod.py: the run's states through the REST API, its output stored, rescheduled
on SIGTERM: what the worker sees of `prefect flow-run execute`, without its seconds of CPU; the end-to-end runs
with the real thing are in tests/test_runpod_worker.py and the other modules here). Every scenario ends with the
same invariants (tests/runpod_support.py): no pod left, never two billed pods for one flow run, and the outputs
of the runs that finished, intact."""

import json
import os
import signal
import time
import uuid

import pytest

from ow_prefect.testing.fake_runpod import CAPACITY_DETAIL
from ow_prefect.testing.servers import prefect_worker
from tests.helpers import eventually
from tests.runpod_support import (
    LIGHT_POD_COMMAND,
    WORKER_ENV,
    all_deleted,
    assert_clean,
    assert_outputs_intact,
    cancel,
    deploy,
    finished,
    make_pool,
    pods_of,
    run_logs,
    wait_for,
)

pytestmark = pytest.mark.slow


def payload() -> str:
    return f"output-{uuid.uuid4()}"


def completed_with_output(prefect_client, fake, flow_run, expected: str, timeout: float = 90) -> None:
    done = wait_for(prefect_client, flow_run.id, finished, timeout=timeout)
    assert done.state.is_completed(), done.state
    assert_clean(fake)
    assert_outputs_intact({flow_run.id: expected})


# ---- RunPod's API misbehaves ---------------------------------------------------------------------------


def test_capacity_errors_move_on_to_the_next_candidate(prefect_client, fake, start_run):
    # The catalog lists these as available, but the first two creates answer RunPod's capacity 400.
    fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=2)
    output = payload()
    flow_run = start_run(seconds=0.5, cloud="ANY", payload=output)
    completed_with_output(prefect_client, fake, flow_run, output)
    (pod,) = pods_of(fake, flow_run.id)
    # ANY, cheapest first: A6000 COMMUNITY $0.33 and RTX 4090 COMMUNITY $0.34 had none; A6000 SECURE $0.49 next
    assert (pod.gpu["id"], pod.cloud) == ("NVIDIA RTX A6000", "SECURE")
    messages = run_logs(prefect_client, flow_run.id)
    assert messages.count("No capacity for") == 2 and "Creating pod 3/" in messages


def test_capacity_errors_on_every_candidate_fail_the_run_naming_what_was_tried(prefect_client, fake, start_run):
    fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=2)
    flow_run = start_run(gpu_types=["NVIDIA RTX A6000", "NVIDIA A100 80GB PCIe"])
    done = wait_for(prefect_client, flow_run.id, finished)
    assert done.state.is_failed() and done.state.name == "NoCapacity"
    assert "RTX A6000" in done.state.message and "A100 80GB PCIe" in done.state.message
    assert not pods_of(fake, flow_run.id)
    assert_clean(fake)


def test_with_capacity_wait_the_worker_retries_until_a_gpu_frees_up(prefect_client, fake, start_run):
    fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=1)
    output = payload()
    flow_run = start_run(seconds=0.5, gpu_types=["NVIDIA RTX A6000"], capacity_wait=60, payload=output)
    completed_with_output(prefect_client, fake, flow_run, output)
    assert "No candidate has capacity; trying again in 5 s" in run_logs(prefect_client, flow_run.id)
    assert len(pods_of(fake, flow_run.id)) == 1


def test_rate_limits_and_server_errors_on_create_get_and_delete(prefect_client, fake, start_run):
    """429 with Retry-After and 5xx on every call the worker makes for a run: it waits as told, retries, never
    creates a second pod, and still deletes the pod at the end."""
    first = len(fake.requests)
    fake.inject("POST", r"/pods$", status=429, retry_after=2)
    fake.inject("POST", r"/pods$", status=503)  # unknown outcome: the client looks for the pod before creating
    fake.inject("GET", r"/pods/\w+$", status=500, times=2)
    fake.inject("GET", r"/pods/\w+$", status=429, retry_after=1)
    fake.inject("DELETE", r"/pods/\w+$", status=502)
    fake.inject("DELETE", r"/pods/\w+$", status=429, retry_after=2)
    output = payload()
    flow_run = start_run(seconds=2, payload=output)
    completed_with_output(prefect_client, fake, flow_run, output)
    (pod,) = pods_of(fake, flow_run.id)

    calls = list(zip(fake.requests[first:], fake.request_times[first:], strict=True))
    creates = [at for (method, path, _), at in calls if method == "POST" and path.endswith("/pods")]
    deletes = [at for (method, path, _), at in calls if method == "DELETE" and path.endswith(pod.id)]
    assert len(creates) == 3 and len(deletes) == 3
    assert creates[1] - creates[0] >= 2  # Retry-After: 2 was honoured
    assert deletes[2] - deletes[1] >= 2
    lists = [at for (method, path, _), at in calls if method == "GET" and path.endswith("/pods")]
    assert any(creates[1] < at < creates[2] for at in lists), "after the 503 the client looked for the pod first"


def test_a_lost_create_response_makes_no_second_pod(prefect_client, fake, start_run):
    fake.inject("POST", r"/pods$", lose_response=True)
    output = payload()
    flow_run = start_run(seconds=0.5, payload=output)
    completed_with_output(prefect_client, fake, flow_run, output)
    assert len(pods_of(fake, flow_run.id)) == 1


# ---- the pod misbehaves ----------------------------------------------------------------------------------


def test_a_crash_looping_container_crashes_the_run_with_its_last_lines(prefect_client, fake, start_run):
    flow_run = start_run(command="echo 'cannot import flows: boom-marker' >&2; exit 3")
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed(), done.state
    assert "container exited before the flow run finished" in done.state.message
    assert "boom-marker" in done.state.message
    assert_clean(fake)


def test_a_pod_that_never_leaves_starting_is_deleted_at_startup_timeout(prefect_client, fake, start_run):
    fake.stall_boots(1)  # the image pull never ends: RUNNING with no runtime, forever
    flow_run = start_run(startup_timeout=4, max_pod_attempts=1)  # one pod: no retry (see test_runpod_retry.py)
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed() and "startup_timeout (4 s)" in done.state.message, done.state
    assert "pulling image" in done.state.message  # the pod's own log, for the user to see why
    (pod,) = pods_of(fake, flow_run.id)
    assert pod.restarts == 0 and pod.started_at is None
    assert_clean(fake)


def test_a_container_whose_flow_never_starts_is_deleted_at_startup_timeout(prefect_client, fake, start_run):
    flow_run = start_run(command="sleep 600", startup_timeout=4)
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed() and "startup_timeout (4 s)" in done.state.message
    assert_clean(fake)


def test_a_preempted_pod_reschedules_the_run_onto_a_new_pod(prefect_client, fake, start_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    output = payload()
    flow_run = start_run(seconds=6, payload=output)
    wait_for(prefect_client, flow_run.id, lambda fr: fr.state.is_running())
    (first,) = pods_of(fake, flow_run.id)
    time.sleep(1)
    fake.preempt(first.id)
    done = wait_for(prefect_client, flow_run.id, finished, timeout=120)
    assert done.state.is_completed() and done.run_count == 2, done.state
    assert_clean(fake)
    assert_outputs_intact({flow_run.id: output})
    pods = pods_of(fake, flow_run.id)
    assert len(pods) == 2

    def rows():
        key = f"runpod-cost-{flow_run.id}"
        found = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        data = max(found, key=lambda a: a.created).data if found else "[]"
        return len(json.loads(data)) == 2 and json.loads(data)

    table = eventually(rows)
    assert table and [row["pod"] for row in table] == [p.id for p in pods]


# ---- the user cancels ------------------------------------------------------------------------------------


def test_cancelled_while_the_pod_boots(prefect_client, fake, start_run):
    fake.stall_boots(1)
    flow_run = start_run()
    assert eventually(lambda: pods_of(fake, flow_run.id), timeout=30)
    cancel(prefect_client, flow_run.id)
    cancelled_at = time.monotonic()
    assert all_deleted(fake, flow_run.id, timeout=15)
    assert time.monotonic() - cancelled_at < 10
    assert wait_for(prefect_client, flow_run.id, finished, timeout=30).state.is_cancelled()
    assert_clean(fake)


def test_cancelled_while_running(prefect_client, fake, start_run):
    flow_run = start_run(seconds=120)
    wait_for(prefect_client, flow_run.id, lambda fr: fr.state.is_running())
    cancel(prefect_client, flow_run.id)
    cancelled_at = time.monotonic()
    assert all_deleted(fake, flow_run.id, timeout=20)
    assert time.monotonic() - cancelled_at < 15
    assert wait_for(prefect_client, flow_run.id, finished, timeout=30).state.is_cancelled()
    assert_clean(fake)


# ---- workers come and go ---------------------------------------------------------------------------------


def test_a_worker_killed_mid_run_is_replaced_and_the_new_one_deletes_the_pod(
    prefect_client, fake, prefect_api, tmp_path
):
    pool = "ow-test-runpod-restart"
    make_pool(prefect_client, fake, pool, command=LIGHT_POD_COMMAND)
    deployment_id = deploy(prefect_client, pool, "restart")
    output = payload()
    flow_run = prefect_client.create_flow_run_from_deployment(
        deployment_id, parameters={"seconds": 3, "payload": output}
    )
    with prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, tmp_path / "first.log") as first:
        wait_for(prefect_client, flow_run.id, lambda fr: fr.state.is_running())
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (pod,) = pods_of(fake, flow_run.id)
    assert wait_for(prefect_client, flow_run.id, finished).state.is_completed()
    # nobody deletes it: RunPod restarts its container and bills on (the restart takes a while on a loaded machine)
    assert eventually(lambda: pod.restarts >= 1, timeout=60) and pod.deleted_at is None
    with prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, tmp_path / "second.log"):
        assert eventually(lambda: pod.deleted_at, timeout=30)
    assert "Reconciler: deleting pod" in (tmp_path / "second.log").read_text()
    assert_clean(fake)
    assert_outputs_intact({flow_run.id: output})


def test_two_workers_on_one_pool_run_each_flow_run_once(prefect_client, fake, prefect_api, tmp_path):
    """Both poll the same pool and both reconcile it every 2 s: each run gets exactly one pod, and neither
    worker's reconciler deletes a pod the other one is watching."""
    pool = "ow-test-runpod-two"
    make_pool(prefect_client, fake, pool, command=LIGHT_POD_COMMAND)
    deployment_id = deploy(prefect_client, pool, "two-workers")
    outputs = {}
    with (
        prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, tmp_path / "a.log"),
        prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, tmp_path / "b.log"),
    ):
        for _ in range(6):
            output = payload()
            flow_run = prefect_client.create_flow_run_from_deployment(
                deployment_id, parameters={"seconds": 6, "payload": output}
            )
            outputs[flow_run.id] = output
        for flow_run_id in outputs:
            done = wait_for(prefect_client, flow_run_id, finished, timeout=180)
            assert done.state.is_completed() and done.run_count == 1, done.state
        assert_clean(fake)
    assert all(len(pods_of(fake, flow_run_id)) == 1 for flow_run_id in outputs)
    assert_outputs_intact(outputs)
    created = [(tmp_path / f"{name}.log").read_text().count("created: 1x") for name in "ab"]
    print(f"pods created by worker a, b: {created}")
    assert sum(created) == 6


@pytest.fixture(autouse=True)
def _pods_from_this_module_only(fake):
    """A scenario's (or an earlier module's) leftovers would fail the next one's assert_clean: start each from a
    clean fake."""
    assert_clean(fake, timeout=30)
    yield

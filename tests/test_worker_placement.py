"""A GPU that does not work costs one attempt, not every run (ow_prefect/workers/placement.py, issue 22): on the
session's FakeRunPod, whose pods run docker/entrypoint.sh and so the real GPU health check on a simulated
nvidia-smi (ow_prefect/testing/fake_gpus.py), a broken GPU type is tried once, the run completes on the next
candidate, the type cools down for the next run — of a second worker too — and the cost table lists both pods.

The session worker (a `prefect worker start` process) runs the first runs; the "second worker" is a RunPodWorker
in this process on a pool of its own, so that it, and not the session worker, takes the next run. Runs use their
own image, so their cooldowns never steer another module's runs (which clear them anyway: runpod_support)."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ow_prefect.workers.cooldown import CooldownStore
from ow_prefect.workers.placement import verified_gpu_types
from tests.helpers import EVENT_SECONDS, eventually
from tests.runpod_support import (
    LIGHT_POD_COMMAND,
    WORKER_ENV,
    assert_clean,
    assert_outputs_intact,
    clear_cooldowns,
    deploy,
    finished,
    make_pool,
    pods_of,
    run_logs,
    wait_for,
)

pytestmark = pytest.mark.slow

IMAGE = "ghcr.io/test/ow-placement:1"
A6000, RTX4090, A100 = "NVIDIA RTX A6000", "NVIDIA GeForce RTX 4090", "NVIDIA A100 80GB PCIe"
HOST_CUDA = {"min_cuda_version": "12.8"}  # what the image needs: an old driver (CUDA 12.2) fails the check
OW = shutil.which("ow", path=str(Path(sys.executable).parent)) or "ow"


@pytest.fixture
def run(start_run):
    """start_run on this module's image, the host CUDA floor set; cooldowns cleared afterwards too."""

    def start(**variables):
        return start_run(seconds=0.5, **{"image": IMAGE, **HOST_CUDA, **variables})

    yield start
    clear_cooldowns()


def cost_rows(prefect_client, flow_run_id, count: int) -> list[dict]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    def rows():
        key = f"runpod-cost-{flow_run_id}"
        found = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        data = json.loads(max(found, key=lambda a: a.created).data) if found else []
        return data if len(data) == count else None

    table = eventually(rows)
    assert table, f"the cost table of {flow_run_id} never had {count} rows"
    return table


def health_event(prefect_client, pod_id: str):
    """The pod's `ow.pod.healthy` or `ow.pod.unhealthy` event (events reach the server a moment late)."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    names = EventNameFilter(name=["ow.pod.healthy", "ow.pod.unhealthy"])
    event_filter = EventFilter(resource=EventResourceFilter(id=[f"runpod.pod.{pod_id}"]), event=names)
    event = eventually(
        lambda: next(iter(prefect_client.read_events(filter=event_filter, limit=5).events), None),
        timeout=EVENT_SECONDS,
    )
    assert event, f"pod {pod_id} has no health event"
    return event


def cooldowns(prefect_api) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await CooldownStore(client).active(IMAGE)

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        return asyncio.run(read())


def ow(prefect_api, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    return subprocess.run([OW, *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_type_whose_pods_see_no_gpu_is_tried_once_and_cools_down_for_every_worker(
    prefect_client, prefect_api, fake, run, monkeypatch
):
    fake.gpus.break_type(A6000, "no_gpu")  # the cheapest type that fits, everywhere
    payload = f"output-{uuid.uuid4()}"
    first_run = run(payload=payload)
    done = wait_for(prefect_client, first_run.id, finished)
    assert done.state.is_completed(), done.state
    assert_clean(fake)
    assert_outputs_intact({first_run.id: payload})
    broken, good = pods_of(fake, first_run.id)
    assert (broken.gpu["id"], good.gpu["id"]) == (A6000, RTX4090)  # the next cheapest, $0.59/h
    assert done.infrastructure_pid == f"runpod::{good.id}"

    rows = cost_rows(prefect_client, first_run.id, 2)
    assert [row["pod"] for row in rows] == [broken.id, good.id]
    assert "GPU health check failed: nvidia-smi: exit code 6: No devices were found" in rows[0]["ended"]
    assert "tried elsewhere" in rows[0]["ended"] and rows[1]["ended"] == "the flow run is Completed"
    retried = f"Pod {broken.id} failed before the flow started: its GPU health check failed"
    assert eventually(lambda: retried in run_logs(prefect_client, first_run.id))
    assert "trying the next candidate (pod 2 of at most 3)" in run_logs(prefect_client, first_run.id)

    unhealthy, healthy = health_event(prefect_client, broken.id), health_event(prefect_client, good.id)
    assert unhealthy.event == "ow.pod.unhealthy" and unhealthy.related[0].id == f"prefect.flow-run.{first_run.id}"
    assert (unhealthy.payload["gpu"], unhealthy.payload["data_center"]) == (f"1x {A6000}", "US-TX-3")
    assert unhealthy.payload["problems"] == ["nvidia-smi: exit code 6: No devices were found"]
    assert healthy.event == "ow.pod.healthy" and healthy.payload["gpus_seen"] == [f"{RTX4090} (23.6 GB)"]
    assert (healthy.payload["driver"], healthy.payload["cuda"]) == ("570.124.06", "12.8")

    (cooling,) = cooldowns(prefect_api)
    assert (cooling.gpu_type, cooling.data_center, cooling.level) == (A6000, "US-TX-3", 0)
    assert cooling.until - cooling.since == 600
    listed = ow(prefect_api, "gpus")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(A6000))
    assert line.startswith(f"{A6000}\t-\tUS-TX-3, {IMAGE}: cooling down until ") and "No devices were found" in line
    assert f"{A100}\tverified {verified_gpu_types()[A100]['date']}\tok" in listed.stdout.splitlines()

    # A second worker, on a pool of its own, skips the type without renting it: one pod, the 4090.
    for name, value in WORKER_ENV.items():  # its timings are the session worker's
        monkeypatch.setenv(name, value)
    second_run = _run_on_a_second_worker(prefect_client, prefect_api, fake)
    assert second_run.state.is_completed(), second_run.state
    (only,) = pods_of(fake, second_run.id)
    assert only.gpu["id"] == RTX4090
    skipped = f"Skipping 1x {A6000} (48 GB) in SECURE at $0.49/h: US-TX-3: cooling down until"
    assert eventually(lambda: skipped in run_logs(prefect_client, second_run.id))  # logs arrive in batches
    assert_clean(fake)

    cleared = ow(prefect_api, "gpus", "--clear", A6000)
    assert cleared.stdout.split("\t")[:3] == ["cleared", A6000, "US-TX-3"], cleared.stdout + cleared.stderr
    assert cooldowns(prefect_api) == []


def _run_on_a_second_worker(prefect_client, prefect_api, fake):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect.workers.runpod import RunPodWorker

    pool = "ow-test-runpod-second"
    make_pool(prefect_client, fake, pool, command=LIGHT_POD_COMMAND)
    deployment_id = deploy(prefect_client, pool, "placement-second-worker", image=IMAGE, **HOST_CUDA)
    flow_run = prefect_client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": 0.5})

    async def work() -> None:
        async with RunPodWorker(work_pool_name=pool) as worker:
            await worker.get_and_submit_flow_runs()  # leaving the block waits for the run's pod to be deleted

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        asyncio.run(work())
    return wait_for(prefect_client, flow_run.id, finished)


def test_a_retried_run_is_estimated_once_and_capped_per_pod(prefect_client, fake, run):
    """The cost checks (issue 23) and the retry elsewhere compose: the estimate (and its max_cost check) happens once,
    before the first pod; the estimate artifact names the pod the run ran on; the running max_cost counts each pod
    on its own (the failed pod's cost does not cap the next); the cost table keeps one row per pod."""
    fake.gpus.break_type(A6000, "no_gpu")
    flow_run = run(max_cost=5)
    done = wait_for(prefect_client, flow_run.id, finished)
    assert done.state.is_completed(), done.state
    broken, good = pods_of(fake, flow_run.id)
    assert (broken.gpu["id"], good.gpu["id"]) == (A6000, RTX4090)
    rows = cost_rows(prefect_client, flow_run.id, 2)
    assert [row["pod"] for row in rows] == [broken.id, good.id]
    assert all(pod.env["OW_POD_MAX_COST"] == "5.0" for pod in (broken, good))
    created = f"Pod {good.id} created"
    assert eventually(lambda: created in run_logs(prefect_client, flow_run.id))
    logs = run_logs(prefect_client, flow_run.id)
    assert logs.count("Estimate:") == 1, logs
    estimate = eventually(lambda: _latest_artifact(prefect_client, f"runpod-estimate-{flow_run.id}"))
    assert RTX4090 in estimate.data, estimate.data
    assert_clean(fake)


def _latest_artifact(prefect_client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    found = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created) if found else None


@pytest.mark.parametrize(
    ("fault", "problem"),
    [("half_vram", "has 23.6 GB, NVIDIA RTX A6000 has 48 GB"), ("old_driver", "supports CUDA 12.2, the image needs")],
)
def test_half_the_memory_or_an_old_driver_cost_one_pod_too(prefect_client, prefect_api, fake, run, fault, problem):
    fake.gpus.break_type(A6000, fault)
    flow_run = run()
    done = wait_for(prefect_client, flow_run.id, finished)
    assert done.state.is_completed(), done.state
    broken, good = pods_of(fake, flow_run.id)
    assert (broken.gpu["id"], good.gpu["id"]) == (A6000, RTX4090)
    rows = cost_rows(prefect_client, flow_run.id, 2)
    assert problem in rows[0]["ended"]
    assert [(c.gpu_type, c.data_center) for c in cooldowns(prefect_api)] == [(A6000, "US-TX-3")]
    assert_clean(fake)


def test_the_same_type_is_tried_in_another_data_center(prefect_client, prefect_api, fake, run):
    fake.gpus.break_type(A6000, "no_gpu", data_center="US-TX-3")
    fake.set_stock(A6000, 2, "SECURE", "US-KS-2", 0.49)
    try:
        flow_run = run()
        done = wait_for(prefect_client, flow_run.id, finished)
        assert done.state.is_completed(), done.state
        first, second = pods_of(fake, flow_run.id)
        assert [(pod.gpu["id"], pod.data_center_id) for pod in (first, second)] == [
            (A6000, "US-TX-3"),
            (A6000, "US-KS-2"),
        ]
        create = [body for method, path, body in fake.requests if method == "POST" and path.endswith("/pods")][-1]
        assert create["dataCenterIds"] == ["US-KS-2"]
        assert [(c.gpu_type, c.data_center) for c in cooldowns(prefect_api)] == [(A6000, "US-TX-3")]
        assert_clean(fake)
    finally:  # once the pods gave their GPUs back
        eventually(lambda: all(pod.deleted_at for pod in fake.pods.values()), timeout=30)
        fake.set_stock(A6000, 0, "SECURE", "US-KS-2")


def test_when_every_pod_fails_the_run_crashes_naming_each(prefect_client, fake, run):
    for gpu in (A6000, RTX4090, A100):  # the three cheapest that fit
        fake.gpus.break_type(gpu, "no_gpu")
    flow_run = run()
    done = wait_for(prefect_client, flow_run.id, finished, timeout=120)
    assert done.state.is_crashed(), done.state
    pods = pods_of(fake, flow_run.id)
    assert [pod.gpu["id"] for pod in pods] == [A6000, RTX4090, A100]
    message = done.state.message
    assert message.startswith("3 pod(s) failed before the flow started: 1) pod ")
    for number, pod in enumerate(pods, 1):
        assert f"{number}) pod {pod.id}: 1x {pod.gpu['id']} in US-TX-3 (SECURE): its GPU health check failed" in message
    assert "max_pod_attempts (3) reached" in message and "No devices were found" in message
    assert len(cost_rows(prefect_client, flow_run.id, 3)) == 3
    assert_clean(fake)


def test_when_no_candidate_is_left_the_run_crashes_naming_the_pods_and_the_cooldown(prefect_client, fake, run):
    for gpu in (A6000, RTX4090):
        fake.gpus.break_type(gpu, "half_vram")
    flow_run = run(gpu_types=[A6000, RTX4090])
    done = wait_for(prefect_client, flow_run.id, finished, timeout=120)
    assert done.state.is_crashed(), done.state
    assert len(pods_of(fake, flow_run.id)) == 2
    message = done.state.message
    assert message.startswith("2 pod(s) failed before the flow started: 1) pod ")
    assert "No other GPU type or data center is left to try" in message
    assert "2 on cooldown after their pods failed" in message and "ow gpus --clear TYPE" in message
    assert_clean(fake)


def test_a_container_that_never_starts_costs_one_pod(prefect_client, prefect_api, fake, run):
    fake.stall_boots(1)  # the first pod's image pull never ends
    # the good pod must start its flow within the same timeout: 4 s was too short on 2 loaded cores
    flow_run = run(startup_timeout=10)
    done = wait_for(prefect_client, flow_run.id, finished, timeout=90)
    assert done.state.is_completed(), done.state
    stalled, good = pods_of(fake, flow_run.id)
    assert stalled.started_at is None and good.gpu["id"] == RTX4090
    (cooling,) = cooldowns(prefect_api)
    assert "startup_timeout (10 s)" in cooling.reason
    assert_clean(fake)


def test_a_pod_whose_check_passed_is_not_retried_when_its_command_dies(prefect_client, fake, run):
    flow_run = run(command="echo 'cannot import flows: boom-marker' >&2; exit 3")
    done = wait_for(prefect_client, flow_run.id, finished, timeout=60)
    assert done.state.is_crashed() and "boom-marker" in done.state.message, done.state
    assert len(pods_of(fake, flow_run.id)) == 1  # the GPU was fine: another one would die the same way
    assert_clean(fake)


def test_verified_keeps_the_run_to_the_verified_types(prefect_client, prefect_api, fake, run, runpod_pool):
    """As docs/runpod.md writes it for one run: `prefect deployment run ... --job-variable gpu_types=verified`."""
    deployment = prefect_client.read_deployment(
        deploy(prefect_client, runpod_pool, "placement-verified", image=IMAGE, **HOST_CUDA)
    )
    flow = prefect_client.read_flow(deployment.flow_id)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    started = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", f"{flow.name}/{deployment.name}"]
        + ["--param", "seconds=0.5", "--job-variable", "gpu_types=verified"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    done = wait_for(prefect_client, flow_run_id, finished)
    assert done.state.is_completed(), done.state
    (pod,) = pods_of(fake, flow_run_id)
    assert pod.gpu["id"] == A100  # the A6000 and the 4090 are cheaper, but not on the list
    assert_clean(fake)

    capped = run(gpu_types="verified", max_price_per_hour=1.0)  # the A100 costs $1.64/h
    done = wait_for(prefect_client, capped.id, finished)
    assert done.state.is_failed() and done.state.name == "NoCapacity"
    assert "2 not verified" in done.state.message and "gpu_types: [] takes any type that fits" in done.state.message

"""Warm hand-off (ow_prefect/workers/handoff.py, ow_prefect/runpod/agent.py): a pod whose run completed goes on to
the next run of the pool that fits it, on the session's fake RunPod and `runpod` worker, with light pods
(tests/reliability/light_pod.py) run by the pod's agent through docker/entrypoint.sh, as in the images.

Every scenario ends with tests/runpod_support.py's invariants (no pod left, never two billed pods for one run)
plus the hand-off's own: each run executed by exactly one pod, once (the agent logs each run it starts), and
each run's cost rows covering only its own time on the pod."""

import json
import os
import signal
import time
import uuid

import pytest

from tests.helpers import eventually
from tests.runpod_support import (
    LIGHT_POD_COMMAND,
    WORKER_ENV,
    assert_clean,
    assert_outputs_intact,
    cancel,
    deploy,
    finished,
    make_pool,
    pods_of,
    wait_for,
    what_workers_said,
)

pytestmark = pytest.mark.slow

KEEP = 15  # keep_warm_seconds: longer than a light run's pick-up (2 s poll) on a loaded machine, short for a test
GAP = 3.0  # a researcher's loop submits the next run this long after the previous one completed (the worker's
# watch, every 0.5 s here, has seen the end by then: the next run is not yet queued when the pod's fate is decided)


def payload() -> str:
    return f"output-{uuid.uuid4()}"


def new_pods(fake, before: set[str]) -> list:
    return sorted((p for p in list(fake.pods.values()) if p.id not in before), key=lambda p: p.created_at)


def assert_pods(fake, before: set[str], count: int) -> list:
    """The pods the test made, `count` of them; else what the session worker said about each (the hand-offs are
    decided by timing, and a loaded machine stretches it)."""
    pods = new_pods(fake, before)
    assert len(pods) == count, f"{[(p.id, p.name) for p in pods]}\n{what_workers_said(pods)}"
    return pods


def executions(fake, flow_run_id) -> int:
    """How many times any pod started this run (the agent's line per run; a pod without the agent runs one)."""
    return sum(
        f"running flow run {flow_run_id}" in line.line for pod in list(fake.pods.values()) for line in list(pod.logs)
    )


def infrastructure_pod(prefect_client, flow_run_id) -> str:
    return (prefect_client.read_flow_run(flow_run_id).infrastructure_pid or "").removeprefix("runpod::")


def cost_rows(prefect_client, flow_run_id, count: int) -> list[dict]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    def rows():
        key = f"runpod-cost-{flow_run_id}"
        found = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        data = json.loads(max(found, key=lambda a: a.created).data) if found else []
        return data if len(data) >= count else None

    table = eventually(rows, timeout=30)
    assert table, f"no {count} cost row(s) for {flow_run_id}"
    return table


def run_one(prefect_client, deployment_id, seconds=0.5, timeout=90, gap=GAP, **job_variables):
    output = payload()
    flow_run = prefect_client.create_flow_run_from_deployment(
        deployment_id, parameters={"seconds": seconds, "payload": output}, job_variables=job_variables or None
    )
    done = wait_for(prefect_client, flow_run.id, finished, timeout=timeout)
    assert done.state.is_completed(), done.state
    time.sleep(gap)
    return done, output


@pytest.fixture
def warm_deployment(prefect_client, fake, runpod_pool, runpod_worker, start_run, request):
    """A deployment of the sleeper on the session pool with keep_warm_seconds (start_run clears the fake's faults).
    Its env names the test: the session worker remembers bursts per pod shape, and each test starts with none."""

    def make(keep=KEEP, concurrency_limit=None, env=None, **job_variables):
        name = f"handoff-{request.node.name[:40]}-{keep}"
        job_variables["env"] = {"OW_TEST_CASE": request.node.name[:60], **(env or {})}
        if concurrency_limit is None:
            return deploy(prefect_client, runpod_pool, name, keep_warm_seconds=keep, **job_variables)
        from prefect.client.schemas.actions import DeploymentUpdate

        deployment_id = deploy(prefect_client, runpod_pool, name, keep_warm_seconds=keep, **job_variables)
        prefect_client.update_deployment(deployment_id, DeploymentUpdate(concurrency_limit=concurrency_limit))
        return deployment_id

    return make


# ---- a hand-off happens, and only when it should ---------------------------------------------------------


def test_two_queued_runs_of_a_deployment_share_one_pod(prefect_client, fake, warm_deployment):
    """Two runs submitted together to a deployment that runs one at a time (concurrency_limit 1, a sweep run
    one after another): the second waits in the pool, so the first's pod is kept warm and handed to it. One pod,
    each run executed once, each run's cost row its own share."""
    before = set(fake.pods)
    deployment_id = warm_deployment(keep=60, concurrency_limit=1)
    outputs = {}
    for _ in range(2):
        output = payload()
        run = prefect_client.create_flow_run_from_deployment(
            deployment_id, parameters={"seconds": 1, "payload": output}
        )
        outputs[run.id] = output
    done = [wait_for(prefect_client, run_id, finished, timeout=120) for run_id in outputs]
    assert all(run.state.is_completed() and run.run_count == 1 for run in done), [r.state for r in done]
    assert_clean(fake, timeout=30)
    assert_outputs_intact(outputs)
    (pod,) = new_pods(fake, before)
    assert all(infrastructure_pod(prefect_client, run_id) == pod.id for run_id in outputs)
    assert [executions(fake, run_id) for run_id in outputs] == [1, 1]
    first, second = sorted(done, key=lambda run: run.start_time)
    handed = cost_rows(prefect_client, first.id, 1)
    assert "handed over to flow run" in handed[0]["ended"] and handed[0]["warm_idle_s"] >= 0
    taken = cost_rows(prefect_client, second.id, 1)
    assert f"handed over from {first.id}" in taken[0]["ended"] and taken[0]["pod"] == pod.id
    billed = (pod.deleted_at - pod.created_at).total_seconds()
    total = handed[0]["billed_seconds"] + taken[0]["billed_seconds"]
    assert abs(total - billed) < 5, (total, billed)  # the two rows split the pod's time, nothing twice


def test_a_sequential_loop_hands_the_pod_on_from_its_second_run(prefect_client, fake, warm_deployment):
    """A researcher's loop (each run submitted once the previous one completed): the first run's pod is deleted at
    once (nothing says another run comes: a lone run costs what it did), the second one's arrival within
    keep_warm_seconds shows a burst, and from then on the pod is handed on: 3 runs, 2 pods."""
    before = set(fake.pods)
    deployment_id = warm_deployment()
    runs, outputs = [], {}
    for _ in range(3):
        run, output = run_one(prefect_client, deployment_id)
        runs.append(run)
        outputs[run.id] = output
    assert_clean(fake, timeout=KEEP + 20)
    assert_outputs_intact(outputs)
    pods = assert_pods(fake, before, 2)
    assert [infrastructure_pod(prefect_client, run.id) for run in runs] == [pods[0].id, pods[1].id, pods[1].id]
    assert all(executions(fake, run.id) == 1 for run in runs)
    (first_row,) = cost_rows(prefect_client, runs[0].id, 1)
    assert "warm_idle_s" not in first_row  # deleted at once: no warm time billed to a lone run
    (last_row,) = cost_rows(prefect_client, runs[2].id, 1)
    assert "no run came" in last_row["ended"] and last_row["warm_idle_s"] >= KEEP - 1


def test_keep_warm_zero_is_a_pod_per_run_as_before(prefect_client, fake, warm_deployment):
    before = set(fake.pods)
    deployment_id = warm_deployment(keep=0)
    runs = [run_one(prefect_client, deployment_id)[0] for _ in range(2)]
    assert_clean(fake)
    pods = new_pods(fake, before)
    assert [p.name for p in pods] == [f"ow-{run.id}" for run in runs]
    assert all("OW_KEEP_WARM_SECONDS" not in p.env for p in pods)  # no agent: the command runs as before
    assert not any("agent:" in line.line for p in pods for line in p.logs)


def test_a_run_that_does_not_fit_gets_its_own_pod(prefect_client, fake, warm_deployment):
    """A warm pod is not handed to a run that needs more GPU memory than it has, nor to one with another image;
    the warm pod is deleted at the end of its keep_warm_seconds, billed to the run that kept it."""
    before = set(fake.pods)
    deployment_id = warm_deployment()
    first, _ = run_one(prefect_client, deployment_id)
    second, _ = run_one(prefect_client, deployment_id)  # a burst: its pod is kept warm
    warm_pod = infrastructure_pod(prefect_client, second.id)
    assert eventually(lambda: "kept warm" in run_logs_of(prefect_client, second.id), timeout=20)
    bigger, _ = run_one(prefect_client, deployment_id, min_vram_gb=60)  # a 48 GB A6000 does not fit 60 GB + margin
    assert infrastructure_pod(prefect_client, bigger.id) not in (warm_pod, "")
    other_image, _ = run_one(prefect_client, deployment_id, image="ghcr.io/example/other:1")
    bigger_pod = infrastructure_pod(prefect_client, bigger.id)
    assert infrastructure_pod(prefect_client, other_image.id) not in (warm_pod, bigger_pod)
    assert_clean(fake, timeout=KEEP + 30)
    assert_pods(fake, before, 4)
    (row,) = cost_rows(prefect_client, second.id, 1)
    assert "no run came" in row["ended"]


def kept_warm(prefect_client, pod_id, flow_run_id) -> bool:
    """Whether the worker kept the pod warm after this run: its assignment Variable names the run and a warm time
    still ahead."""
    from ow_prefect.runpod.agent import assignment_variable

    variable = prefect_client.read_variable_by_name(assignment_variable(pod_id))
    value = variable.value if variable is not None else None
    return (
        isinstance(value, dict)
        and value.get("flow_run_id") == str(flow_run_id)
        and float(value.get("warm_until") or 0) > time.time()
    )


def run_logs_of(prefect_client, flow_run_id) -> str:
    from tests.runpod_support import run_logs

    return run_logs(prefect_client, flow_run_id)


# ---- faults with hand-off on -----------------------------------------------------------------------------


def test_cancelling_the_next_run_while_the_pod_is_handed_over(prefect_client, fake, warm_deployment):
    """The second run is cancelled the moment it is handed the pod, before the agent (polling every 3 s here)
    starts it: it ends Cancelled, never runs, gets no other pod, and the pod is deleted."""
    before = set(fake.pods)
    deployment_id = warm_deployment(env={"OW_AGENT_POLL_SECONDS": "3"})
    run_one(prefect_client, deployment_id)
    second, _ = run_one(prefect_client, deployment_id)  # a burst: its pod is kept warm
    warm_pod = infrastructure_pod(prefect_client, second.id)
    third = prefect_client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": 30})
    assert eventually(lambda: infrastructure_pod(prefect_client, third.id) == warm_pod, timeout=30, interval=0.1)
    cancel(prefect_client, third.id)
    assert wait_for(prefect_client, third.id, finished, timeout=60).state.is_cancelled()
    assert_clean(fake)
    assert fake.pods[warm_pod].deleted_at is not None
    assert not pods_of(fake, third.id)  # no pod of its own either
    assert executions(fake, third.id) <= 1  # at most started (the cancel raced the agent), never completed twice
    assert_pods(fake, before, 2)


def test_a_warm_pod_preempted_between_runs_is_deleted_and_the_next_run_gets_a_new_pod(
    prefect_client, fake, warm_deployment
):
    before = set(fake.pods)
    deployment_id = warm_deployment()
    run_one(prefect_client, deployment_id)
    second, _ = run_one(prefect_client, deployment_id)
    warm_pod = infrastructure_pod(prefect_client, second.id)
    assert eventually(lambda: "kept warm" in run_logs_of(prefect_client, second.id), timeout=20)
    fake.preempt(warm_pod)
    assert eventually(lambda: fake.pods[warm_pod].deleted_at, timeout=15)
    third, output = run_one(prefect_client, deployment_id)
    assert infrastructure_pod(prefect_client, third.id) not in (warm_pod, "")
    assert executions(fake, third.id) == 1 and third.run_count == 1
    assert_clean(fake, timeout=KEEP + 20)
    assert_outputs_intact({third.id: output})
    assert_pods(fake, before, 3)


def test_a_warm_pod_that_does_not_start_its_run_is_replaced_by_a_new_pod(prefect_client, fake, warm_deployment):
    """The pod's agent does not look for its next run in time (here: it looks every 1000 s): past the hand-over's
    start timeout (startup_timeout, at most 2 minutes) the worker deletes the pod and, the run still Pending,
    creates a new one for it. The run is executed once."""
    before = set(fake.pods)
    deployment_id = warm_deployment(env={"OW_AGENT_POLL_SECONDS": "1000"}, startup_timeout=10)
    run_one(prefect_client, deployment_id)
    second, _ = run_one(prefect_client, deployment_id, gap=0)  # a burst: kept warm (and the next run comes at once)
    warm_pod = infrastructure_pod(prefect_client, second.id)
    # the pod's assignment says it is warm the moment the worker decides (its log line reaches the API seconds
    # later, and on a loaded machine waiting for it once used up the warm time before the next run came)
    assert eventually(lambda: kept_warm(prefect_client, warm_pod, second.id), timeout=20)
    third, output = run_one(prefect_client, deployment_id, timeout=120)
    assert "kept warm" in run_logs_of(prefect_client, second.id)
    assert "did not start the run" in run_logs_of(prefect_client, third.id)
    assert fake.pods[warm_pod].deleted_at is not None
    (own,) = pods_of(fake, third.id)
    assert infrastructure_pod(prefect_client, third.id) == own.id
    assert executions(fake, third.id) == 1 and third.run_count == 1
    assert_clean(fake, timeout=KEEP + 20)
    assert_outputs_intact({third.id: output})
    assert_pods(fake, before, 3)


def test_workers_killed_during_and_between_handed_off_runs_leave_no_orphan(prefect_client, fake, prefect_api, tmp_path):
    """Worker A hands its warm pod to a run and is killed while that run works: the pod's env names an earlier
    (finished) run, but its assignment names the running one, so worker B's reconciler leaves it until that run
    completes, then deletes it. Worker B keeps a pod warm and is killed between runs: worker C's reconciler
    leaves the warm pod until its warm time is over, then deletes it, and the next run gets a new pod."""
    fake.reset()
    pool = "ow-test-runpod-handoff"
    make_pool(prefect_client, fake, pool, command=LIGHT_POD_COMMAND, keep_warm_seconds=KEEP)
    deployment_id = deploy(prefect_client, pool, "handoff-restart")
    before = set(fake.pods)
    with prefect_worker_for(prefect_api, pool, tmp_path / "a.log") as a:
        run_one(prefect_client, deployment_id)
        second, _ = run_one(prefect_client, deployment_id)
        warm_pod = infrastructure_pod(prefect_client, second.id)
        output = payload()
        third = prefect_client.create_flow_run_from_deployment(
            deployment_id, parameters={"seconds": 8, "payload": output}
        )
        wait_for(prefect_client, third.id, lambda fr: fr.state.is_running())
        assert infrastructure_pod(prefect_client, third.id) == warm_pod
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    with prefect_worker_for(prefect_api, pool, tmp_path / "b.log") as b:
        done = wait_for(prefect_client, third.id, finished, timeout=60)
        assert done.state.is_completed() and done.run_count == 1, done.state  # not deleted under its run
        assert eventually(lambda: fake.pods[warm_pod].deleted_at, timeout=30)
        assert_outputs_intact({third.id: output})
        run_one(prefect_client, deployment_id)
        fifth, _ = run_one(prefect_client, deployment_id)  # a burst in B's eyes: its pod is kept warm
        warm_pod = infrastructure_pod(prefect_client, fifth.id)
        assert eventually(lambda: "kept warm" in run_logs_of(prefect_client, fifth.id), timeout=20)
        os.killpg(b.pid, signal.SIGKILL)
        b.wait()
    with prefect_worker_for(prefect_api, pool, tmp_path / "c.log"):
        sixth, _ = run_one(prefect_client, deployment_id)
        assert infrastructure_pod(prefect_client, sixth.id) != warm_pod
        assert eventually(lambda: fake.pods[warm_pod].deleted_at, timeout=KEEP + 30)
        left_alone = (fake.pods[warm_pod].deleted_at - fifth.end_time).total_seconds()
        assert left_alone >= KEEP - 1, left_alone  # while warm, the reconciler left it alone
        assert_clean(fake, timeout=KEEP + 30)
    assert "Reconciler: deleting pod" in (tmp_path / "c.log").read_text()
    for run_id in {pod.name.removeprefix("ow-") for pod in new_pods(fake, before)} | {str(third.id)}:
        assert executions(fake, run_id) == 1, run_id


def prefect_worker_for(prefect_api, pool, log):
    from ow_prefect.testing.servers import prefect_worker

    return prefect_worker(prefect_api, pool, "runpod", WORKER_ENV, log)


@pytest.fixture(autouse=True)
def _pods_from_this_module_only(fake):
    assert_clean(fake, timeout=60)
    yield

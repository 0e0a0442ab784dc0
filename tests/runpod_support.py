"""What the RunPod worker tests share: a `runpod` pool on FakeRunPod, deployments of small flows, waiting for runs,
and the invariants every fault scenario ends with (no pod left, no two billed pods for one run, outputs intact).

Fixtures (tests/conftest.py loads this module as a plugin):
- `fake`: one FakeRunPod for the session (a module may define its own `fake` to isolate itself); its pods run
  docker/entrypoint.sh as the images do, so each one passes the GPU health check (on the simulated nvidia-smi of
  ow_prefect/testing/fake_gpus.py) before its command;
- `runpod_pool`, `runpod_worker`, `runpod_worker_log`: one `runpod` pool on it and one `prefect worker start
  --type runpod` for the whole session, shared by every module that uses them;
- `start_run(seconds=..., fail=..., payload=..., **job_variables)`: deploys tests/runpod_flows.py's sleeper on
  that pool and starts a run. Its pods are *light* (tests/reliability/light_pod.py: Running → work → final
  through the REST API, the payload stored, rescheduled on SIGTERM) unless the test passes
  `command=POD_COMMAND`, a real `prefect flow-run execute` (keep those for end-to-end cases: they cost seconds
  of CPU each). Each start_run test begins with the fake's injected faults, stalled boots and broken GPU types
  cleared, and no GPU on cooldown (ow_prefect/workers/cooldown.py).
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ow_prefect.testing.fake_runpod import FakePod, FakeRunPod, default_image_env
from ow_prefect.testing.servers import prefect_worker
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "rp-test-key-7f3a9c2e5b"
AUTH_STRING = "prefect-auth-secret-41d8"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
POD_COMMAND = f"{sys.executable} -m prefect flow-run execute"
LIGHT_POD_COMMAND = f"{sys.executable} {ROOT / 'tests' / 'reliability' / 'light_pod.py'}"
WORKER_ENV = {
    "OW_RUNPOD_POLL_SECONDS": "0.5",
    "OW_RUNPOD_RECONCILE_SECONDS": "2",
    "PREFECT_API_AUTH_STRING": AUTH_STRING,  # the test server ignores it; it must reach pods and nothing else
}


def make_pool(client, fake: FakeRunPod, name: str, **defaults: Any) -> None:
    """A `runpod` pool whose credentials block points at the fake and whose pods run this interpreter."""
    from prefect.client.schemas.actions import WorkPoolCreate

    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.workers.runpod import RunPodWorker

    block_id = RunPodCredentials(api_key=fake.api_key, api_url=fake.url).save(name, overwrite=True, _sync=True)
    defaults = {"command": POD_COMMAND, "min_vram_gb": 20, **defaults}
    template = RunPodWorker.base_job_template(block_id, **defaults)
    client.create_work_pool(WorkPoolCreate(name=name, type="runpod", base_job_template=template), overwrite=True)


def deploy(client, pool: str, name: str, entrypoint: str = "tests/runpod_flows.py:sleeper", **job_variables: Any):
    from prefect.flows import load_flow_from_entrypoint

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


def pods_of(fake: FakeRunPod, flow_run_id) -> list[FakePod]:
    return [pod for pod in list(fake.pods.values()) if pod.name == f"ow-{flow_run_id}"]


def wait_for(client, flow_run_id, check, timeout: float = 90):
    final = eventually(lambda: check(client.read_flow_run(flow_run_id)), timeout=timeout, interval=0.5)
    assert final, f"flow run {flow_run_id} is {client.read_flow_run(flow_run_id).state}"
    return client.read_flow_run(flow_run_id)


def finished(flow_run) -> bool:
    return flow_run.state.is_final()


def all_deleted(fake: FakeRunPod, flow_run_id, timeout: float = 20) -> bool:
    return eventually(
        lambda: pods_of(fake, flow_run_id) and all(p.deleted_at for p in pods_of(fake, flow_run_id)), timeout=timeout
    )


def cancel(client, flow_run_id) -> None:
    from prefect.states import Cancelling

    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)


def run_logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def billed_until(pod: FakePod) -> datetime | None:
    """When the pod stopped costing money: stopped by RunPod (a preempted pod is EXITED and unbilled until it is
    deleted), else deleted."""
    return pod.stopped_at or pod.deleted_at


def assert_clean(fake: FakeRunPod, timeout: float = 30) -> None:
    """The invariants every fault scenario ends with: no pod left (each one deleted), and never two billed pods
    for one flow run at the same time (a retried create, a second worker or a reschedule must not double up)."""
    if not eventually(lambda: all(pod.deleted_at for pod in list(fake.pods.values())), timeout=timeout):
        left = [pod for pod in list(fake.pods.values()) if not pod.deleted_at]
        raise AssertionError(f"pods left: {[(p.id, p.name, p.status) for p in left]}\n{what_workers_said(left)}")
    by_run: dict[str, list[FakePod]] = {}
    for pod in fake.pods.values():
        by_run.setdefault(pod.name, []).append(pod)
    for name, pods in by_run.items():
        pods.sort(key=lambda pod: pod.created_at)
        for earlier, later in zip(pods, pods[1:], strict=False):
            assert billed_until(earlier) <= later.created_at, (
                f"{name}: pod {later.id} was created while {earlier.id} was still billed"
            )


def what_workers_said(pods: list[FakePod]) -> str:
    """The session worker's log lines about the pods (to diagnose a leftover pod from a CI log)."""
    if _WORKER_LOG is None or not _WORKER_LOG.exists():
        return "(no session worker log)"
    names = {pod.id for pod in pods} | {pod.name.removeprefix("ow-") for pod in pods}
    lines = _WORKER_LOG.read_text(errors="replace").splitlines()
    said = [line for line in lines if any(name in line for name in names)]
    tail = "\n".join(lines[-40:])
    return "the session worker's lines about them:\n" + "\n".join(said[-60:]) + f"\n...its last lines:\n{tail}"


_WORKER_LOG: Path | None = None


# Fixtures (a pytest plugin: tests/conftest.py loads this module). One fake, pool and worker for the session:
# a worker start costs seconds of CPU; start_run clears the faults a test injected before the next one starts.

POOL = "ow-test-runpod"


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    # The images set HF_HOME (docker/Dockerfile); the entrypoint creates it.
    image_env = {"HF_HOME": str(tmp_path_factory.mktemp("hf-home")), **default_image_env()}
    timings = {"boot_seconds": 0.3, "restart_backoff": 0.5, "kill_grace": 2, "log_follow_seconds": 0.3}
    global _SESSION_FAKE
    with FakeRunPod(api_key=API_KEY, entrypoint=str(ENTRYPOINT), image_env=image_env, **timings) as f:
        _SESSION_FAKE = f
        yield f
    _SESSION_FAKE = None


_SESSION_FAKE: FakeRunPod | None = None


@pytest.fixture(scope="module", autouse=True)
def no_pod_outlives_its_module(request):
    """A module that leaves a pod of the session's fake running fails here (its teardown), with what the worker
    said about it, and the pod is deleted: a pod left by one module (say through a worker of its own that stopped
    before deleting it) must not fail the next module's `assert_clean` in its place."""
    created_before = len(_SESSION_FAKE.pods) if _SESSION_FAKE is not None else 0
    yield
    fake = _SESSION_FAKE
    if fake is None:
        return
    ours = lambda: [pod for pod in list(fake.pods.values())[created_before:] if not pod.deleted_at]  # noqa: E731
    if not eventually(lambda: not ours(), timeout=30):
        left = ours()
        for pod in left:
            fake.delete(pod.id)
        pytest.fail(
            f"{request.module.__name__} left pods of the session's FakeRunPod running (now deleted): "
            f"{[(p.id, p.name, p.status) for p in left]}\n{what_workers_said(left)}"
        )


@pytest.fixture(scope="module")
def prefect_client(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="session")
def runpod_pool(prefect_api, fake):
    """The session's `runpod` pool on the fake; its pods are light unless a deployment sets `command`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        make_pool(client, fake, POOL, command=LIGHT_POD_COMMAND)
    return POOL


@pytest.fixture(scope="session")
def runpod_worker_log(tmp_path_factory):
    global _WORKER_LOG
    _WORKER_LOG = tmp_path_factory.mktemp("runpod-worker") / "worker.log"
    return _WORKER_LOG


@pytest.fixture(scope="session")
def runpod_worker(prefect_api, runpod_pool, runpod_worker_log):
    with prefect_worker(prefect_api, runpod_pool, "runpod", WORKER_ENV, runpod_worker_log) as proc:
        yield proc


@pytest.fixture
def start_run(prefect_client, fake, runpod_pool, runpod_worker, request):
    """Deploy the sleeper with job variables and start a run: start_run(seconds=..., payload=..., **job_variables)."""
    fake.reset()
    clear_cooldowns()
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")

    def start(seconds=1.0, fail=False, payload=None, **job_variables):
        name = f"{module[:20]}-{request.node.name[:40]}-{len(job_variables)}"
        deployment_id = deploy(prefect_client, runpod_pool, name, **job_variables)
        parameters = {"seconds": seconds, "fail": fail, **({"payload": payload} if payload else {})}
        return prefect_client.create_flow_run_from_deployment(deployment_id, parameters=parameters)

    return start


def clear_cooldowns() -> None:
    """No GPU type on cooldown: a test's failed pods must not steer the next test's choice of GPU."""
    import asyncio

    from prefect.client.orchestration import get_client

    from ow_prefect.workers.cooldown import CooldownStore

    async def clear() -> None:
        async with get_client() as client:
            await CooldownStore(client).clear()

    asyncio.run(clear())


def assert_outputs_intact(payloads: dict[Any, str]) -> None:
    """Each finished run's output (see runpod_flows.sleeper's `payload`) is in storage, byte for byte."""
    from ow_prefect.hashing import file_id, sha256_bytes
    from ow_prefect.storage import Storage

    storage = Storage.from_settings()
    for flow_run_id, payload in payloads.items():
        expected = file_id("result", sha256_bytes(payload.encode()))
        assert storage.get_bytes(expected) == payload.encode(), f"output of {flow_run_id} is missing or changed"

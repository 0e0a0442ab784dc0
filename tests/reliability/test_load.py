"""Load: many flow runs through ONE `runpod` worker started with `--limit 16`, on FakeRunPod, with the Prefect
server on PostgreSQL (Debian's postgresql, a throwaway cluster started here; see ow_prefect/testing/postgres.py).

What the pods run (`OW_LOAD_POD`):
- `light` (default, CI): tests/reliability/light_pod.py moves the pod's flow run Running -> Completed through
  Prefect's REST API, as `prefect flow-run execute` does, without Prefect's few CPU seconds of start-up per pod
  (on 2 cores, 200 of those take half an hour and measure Prefect's start-up rather than the worker);
- `engine`: a real `prefect flow-run execute` of tests/runpod_flows.py:sleeper in every pod.

The worker is measured on its own (CPU seconds and peak RSS of its process, read from /proc through psutil) and
printed. The test asserts: every run Completed, exactly one pod per run, never more than 16 pods at once (the fake
records each pod's create and delete times), no pod left at the end, and generous bounds on the worker's CPU and
memory.

Marked `load` (and `slow`): `.ci/run` runs it as its own step after `make test`. `OW_LOAD_RUNS` changes the
number of runs (default 200).
"""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from ow_prefect.testing.fake_runpod import FakeRunPod
from ow_prefect.testing.postgres import postgres_cluster
from ow_prefect.testing.servers import prefect_server, prefect_worker
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.load]

RUNS = int(os.environ.get("OW_LOAD_RUNS", "200"))
POD = os.environ.get("OW_LOAD_POD", "light")
POD_COMMANDS = {
    "light": f"{sys.executable} {ROOT / 'tests' / 'reliability' / 'light_pod.py'} 0.5",
    "engine": f"{sys.executable} -m prefect flow-run execute",
}
LIMIT = 16
POOL = "ow-load"
API_KEY = "rp-load-key-3c9e1f"
GPU = "NVIDIA RTX A6000"
# Generous bounds: the worker is one asyncio process watching at most LIMIT pods; measured figures are printed.
MAX_WORKER_RSS_MB = 1024
MAX_WORKER_CPU_S_PER_RUN = 3.0


@pytest.fixture(scope="module")
def postgres_api(tmp_path_factory):
    """A Prefect server of its own, on a PostgreSQL cluster of its own."""
    with (
        postgres_cluster() as database_url,
        prefect_server(
            tmp_path_factory.mktemp("prefect-load-server"),
            timeout=180,
            env={
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
                # On 2 shared cores with 16 pods starting Prefect, a new PostgreSQL backend can take longer than
                # Prefect's 5 s connect timeout (seen as 500s): keep connections pooled, wait longer for one.
                "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
                "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
                "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
            },
        ) as url,
    ):
        yield url


def _final_count(client, deployment_id) -> tuple[int, dict[str, int]]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = []
    offset = 0
    while page := client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200, offset=offset
    ):
        runs += page
        offset += len(page)
    states: dict[str, int] = {}
    for run in runs:
        states[run.state.name] = states.get(run.state.name, 0) + 1
    return sum(run.state.is_final() for run in runs), states


@pytest.mark.timeout(3600)
def test_runs_through_one_worker_with_limit(postgres_api, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.workers.runpod import RunPodWorker

    # restart_backoff: a finished pod's command is not re-run before the worker deletes the pod.
    fake = FakeRunPod(api_key=API_KEY, default_stock=False, boot_seconds=0.3, restart_backoff=60, kill_grace=2)
    fake.set_stock(GPU, 4 * LIMIT, price_per_hour=0.49)  # capacity is not what this test is about
    with (
        fake,
        temporary_settings(updates={PREFECT_API_URL: postgres_api}),
        get_client(sync_client=True) as client,
    ):
        block_id = RunPodCredentials(api_key=API_KEY, api_url=fake.url).save("load", _sync=True)
        template = RunPodWorker.base_job_template(block_id, command=POD_COMMANDS[POD], min_vram_gb=40)
        client.create_work_pool(WorkPoolCreate(name=POOL, type="runpod", base_job_template=template))
        entrypoint = "tests/runpod_flows.py:sleeper"
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("pod-sleeper"),
            name="load",
            entrypoint=entrypoint,
            work_pool_name=POOL,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        )
        start = time.monotonic()
        flow_runs = [
            client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": 0.5}) for _ in range(RUNS)
        ]
        submitted_s = time.monotonic() - start
        log = tmp_path / "worker.log"
        peak_rss = 0
        with prefect_worker(
            postgres_api, POOL, "runpod", {}, log, extra_args=("--limit", str(LIMIT)), query_seconds=1
        ) as proc:
            worker = psutil.Process(proc.pid)
            deadline = time.monotonic() + 3300
            done, states = 0, {}
            while time.monotonic() < deadline:
                peak_rss = max(peak_rss, worker.memory_info().rss)
                done, states = _final_count(client, deployment_id)
                if done == RUNS:
                    break
                assert proc.poll() is None, f"the worker exited; see {log}"
                time.sleep(2)
            wall_s = time.monotonic() - start
            # No pod may outlive its run: give the worker a few polls to delete the last ones.
            deadline = time.monotonic() + 60
            while any(pod.deleted_at is None for pod in fake.pods.values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            cpu = worker.cpu_times()
            worker_cpu_s = cpu.user + cpu.system
            peak_rss = max(peak_rss, worker.memory_info().rss)
            with open(f"/proc/{proc.pid}/status") as status:  # the kernel's own high-water mark
                hwm = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
            peak_rss = max(peak_rss, hwm)

        pods = list(fake.pods.values())
        left = [pod.id for pod in pods if pod.deleted_at is None]
        names = [pod.name for pod in pods]
        figures = {
            "runs": RUNS,
            "pod": POD,
            "limit": LIMIT,
            "wall_s": round(wall_s, 1),
            "submit_s": round(submitted_s, 1),
            "runs_per_min": round(RUNS / wall_s * 60, 1),
            "peak_pods": fake.peak_pods(),
            "pods_created": len(pods),
            "pods_left": len(left),
            "worker_cpu_s": round(worker_cpu_s, 1),
            "worker_cpu_s_per_run": round(worker_cpu_s / RUNS, 3),
            "worker_peak_rss_mb": round(peak_rss / 2**20, 1),
            "states": states,
        }
        with capsys.disabled():
            print(f"\nload figures: {figures}")

    assert done == RUNS, f"{done}/{RUNS} runs final after the deadline: {states}; see {log}"
    assert states == {"Completed": RUNS}, f"not every run completed: {states}; see {log}"
    assert sorted(names) == sorted(f"ow-{run.id}" for run in flow_runs), "not exactly one pod per flow run"
    assert figures["peak_pods"] <= LIMIT, f"{figures['peak_pods']} pods at once with --limit {LIMIT}"
    assert not left, f"pods left running after every run ended: {left}"
    assert peak_rss < MAX_WORKER_RSS_MB * 2**20, f"worker peak RSS {figures['worker_peak_rss_mb']} MB"
    assert worker_cpu_s < MAX_WORKER_CPU_S_PER_RUN * RUNS, f"worker used {worker_cpu_s:.0f} CPU s for {RUNS} runs"

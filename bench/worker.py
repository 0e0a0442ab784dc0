"""How fast the `runpod` worker reacts, on FakeRunPod with a real Prefect server, at its default settings.

    .venv/bin/python bench/worker.py [--runs 20]

Starts a Prefect server (SQLite, loopback), FakeRunPod and `prefect worker start --type runpod` with no tuning
(its defaults: a 2 s work-pool poll and a 2 s run/pod watch), then submits `--runs` flow runs one after another
at random moments and reads, per run:
- scheduled → create request: the run's Scheduled state time to the fake's receipt of `POST /v2/pods`;
- terminal → delete request: the run's final state time to the fake's receipt of `DELETE /v2/pods/{id}`.
Prints the medians and p90s next to OpenWeights' worker (a 15 s queue poll to pick a job up; a pod left idle
for up to 300 s before it shuts itself down) as ratios. Goals: ≤ 3 s and ≤ 5 s.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import emit, row  # noqa: E402

OPENWEIGHTS_POLL_S = 15.0
OPENWEIGHTS_IDLE_SHUTDOWN_S = 300.0


def state_time(states, predicate):
    return next(state.timestamp.timestamp() for state in sorted(states, key=lambda s: s.timestamp) if predicate(state))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ow-bench-worker-"))
    os.environ.update(OW_HOME=str(work / "ow"), PREFECT_HOME=str(work / "prefect-client"))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.testing.fake_runpod import FakeRunPod
    from ow_prefect.testing.servers import prefect_server, prefect_worker
    from ow_prefect.workers.runpod import RunPodWorker

    with (
        prefect_server(work / "prefect-server") as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
        FakeRunPod(api_key="bench-key", boot_seconds=0.5, kill_grace=1) as fake,
        get_client(sync_client=True) as client,
    ):
        block_id = RunPodCredentials(api_key="bench-key", api_url=fake.url).save("bench", _sync=True)
        template = RunPodWorker.base_job_template(block_id, command=f"{sys.executable} -m prefect flow-run execute")
        client.create_work_pool(WorkPoolCreate(name="bench-gpu", type="runpod", base_job_template=template))
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("bench-pod-flow"),
            name="bench",
            entrypoint="bench/pod_flow.py:quick",
            work_pool_name="bench-gpu",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        )
        pickup, cleanup = [], []
        with prefect_worker(url, "bench-gpu", "runpod", {}, work / "worker.log", query_seconds=None):
            time.sleep(5)  # the worker's first poll; not part of any run's latency
            for i in range(args.runs):
                time.sleep(random.uniform(0, 2))  # submit at a random point of the worker's poll cycle
                flow_run = client.create_flow_run_from_deployment(deployment_id)
                deadline = time.monotonic() + 120
                pod = None
                while time.monotonic() < deadline:
                    pods = [p for p in fake.pods.values() if p.name == f"ow-{flow_run.id}"]
                    if pods and pods[0].deleted_at:
                        pod = pods[0]
                        break
                    time.sleep(0.2)
                if pod is None:
                    sys.exit(f"run {flow_run.id} did not finish with its pod deleted; see {work / 'worker.log'}")
                states = client.read_flow_run_states(flow_run.id)
                scheduled = state_time(states, lambda s: s.is_scheduled())
                final = state_time(states, lambda s: s.is_final())
                pickup.append(pod.created_at.timestamp() - scheduled)
                cleanup.append(pod.deleted_at.timestamp() - final)
                print(f"run {i + 1:2d}: scheduled→create {pickup[-1]:5.2f} s   terminal→delete {cleanup[-1]:5.2f} s")

    def summary(name, samples, baseline, goal):
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else median
        print(
            f"{name}: median {median:.2f} s, p90 {p90:.2f} s (goal ≤ {goal:g} s); "
            f"OpenWeights {baseline:g} s → ratio {median / baseline:.3f}"
        )

    print(f"\n{args.runs} runs, worker at default settings:")
    summary("scheduled → create request", pickup, OPENWEIGHTS_POLL_S, 3)
    summary("terminal  → delete request", cleanup, OPENWEIGHTS_IDLE_SHUTDOWN_S, 5)
    pickup_s, cleanup_s = round(statistics.median(pickup), 3), round(statistics.median(cleanup), 3)
    emit(
        "worker",
        [
            row("scheduled → create, median", pickup_s, OPENWEIGHTS_POLL_S, "s", "ours ≤ 3 s", pickup_s <= 3),
            row("terminal → delete, median", cleanup_s, OPENWEIGHTS_IDLE_SHUTDOWN_S, "s", "ours ≤ 5 s", cleanup_s <= 5),
        ],
    )


if __name__ == "__main__":
    main()

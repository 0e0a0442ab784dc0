"""Submit → first step and GPU-seconds billed per job, our `runpod` worker against OpenWeights' cluster manager,
on the same job traces (bench/traces.py: sparse, a burst of sequential short jobs, a parallel burst).

    .venv/bin/python bench/worker.py [--jobs 10] [--boot-pull 90] [--boot-start 10]

Ours, measured: a Prefect server (SQLite, loopback), FakeRunPod, and `prefect worker start --type runpod` at its
defaults (a 2 s work-pool poll, a 2 s run/pod watch); every pod runs a real `prefect flow-run execute` of
bench/pod_flow.py:job, which writes the moment its body starts (the job's first step) and then works. Each trace
is replayed as submitted: all at once for the parallel burst, each job once the previous one's run is final for
the sequential burst. Our worker keeps nothing between runs (a pod per run), so the sparse trace's 30-minute gaps
are replayed as a few seconds: they cannot change a run's figures.

The pods boot in FakeRunPod's `boot_seconds` (1 s) and work 1 s; the boot model (bench/traces.BootModel: image
pull + container start, stated there) and each trace job's work are then put in their place: submit → first
step = measured − 1 s + boot; billed = measured create → delete − 2 s + boot + work. The worker only waits
through a boot and a run (it polls; nothing it does depends on their length), so they add one to one.

OpenWeights, simulated (bench/upstream_sim.py, which cites the files and commit it follows): its manager's
15 s loop, 8 workers at most, a worker's 5 s job poll, its pods kept until 600 s after their creation and
300 s after their last run; the same boot model; a job's first step the moment a worker takes it; 20 phases of
its loop against the trace, pooled.

Prints per trace: median and p90 of submit → first step, and GPU-seconds billed per job, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import emit, row  # noqa: E402
from bench.traces import BootModel, TraceJob, traces  # noqa: E402
from bench.upstream_sim import simulate_many  # noqa: E402

FAKE_BOOT_S = 1.0
FAKE_WORK_S = 1.0
SPARSE_GAP_S = 3.0
SEEDS = 20  # upstream_sim.simulate_many's default: the manager's loop phase sampled 20 times


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else samples[0]


def replay_ours(client, fake, deployment_id, trace: list[TraceJob], marks: Path, boot: BootModel):
    """Run the trace through the worker; (submit → first step, billed seconds) per job, boot and work modelled."""

    def submit():
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"work_s": FAKE_WORK_S})
        return run.id, client.read_flow_run(run.id).created.timestamp()

    def done(run_id) -> bool:
        pods = [p for p in fake.pods.values() if p.name == f"ow-{run_id}"]
        return bool(pods) and all(p.deleted_at for p in pods)

    def wait(run_ids, timeout=300):
        deadline = time.monotonic() + timeout
        while not all(done(r) for r in run_ids):
            if time.monotonic() > deadline:
                sys.exit(f"runs {run_ids} did not end with their pods deleted within {timeout} s")
            time.sleep(0.2)

    submitted = {}
    if all(job.at == 0 for job in trace):  # the parallel burst: everything at once
        for _ in trace:
            run_id, at = submit()
            submitted[run_id] = at
        wait(list(submitted))
    else:  # one after another (a sparse trace's gaps shortened: nothing carries over between runs)
        for job in trace:
            time.sleep(job.after if job.after is not None else SPARSE_GAP_S)
            run_id, at = submit()
            submitted[run_id] = at
            wait([run_id])
    results = []
    for (run_id, submitted_at), job in zip(submitted.items(), trace, strict=True):
        (pod,) = [p for p in fake.pods.values() if p.name == f"ow-{run_id}"]
        first_step = float((marks / str(run_id)).read_text())
        latency = first_step - submitted_at - FAKE_BOOT_S + boot.seconds
        billed = (pod.deleted_at - pod.created_at).total_seconds() - FAKE_BOOT_S - FAKE_WORK_S
        results.append((latency, billed + boot.seconds + job.work_s))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10, help="jobs per burst (the sparse trace has half)")
    parser.add_argument("--boot-pull", type=float, default=BootModel.pull_s)
    parser.add_argument("--boot-start", type=float, default=BootModel.start_s)
    args = parser.parse_args()
    boot = BootModel(args.boot_pull, args.boot_start)
    work = Path(tempfile.mkdtemp(prefix="ow-bench-worker-"))
    marks = work / "first-steps"
    marks.mkdir()
    os.environ.update(OW_HOME=str(work / "ow"), PREFECT_HOME=str(work / "prefect-client"), OW_BENCH_MARKS=str(marks))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.testing.fake_runpod import FakeRunPod
    from ow_prefect.testing.servers import prefect_server, prefect_worker
    from ow_prefect.workers.runpod import RunPodWorker

    print(f"boot model: {boot.pull_s:g} s image pull + {boot.start_s:g} s container start = {boot.seconds:g} s")
    ours = {}
    with (
        prefect_server(work / "prefect-server") as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
        FakeRunPod(api_key="bench-key", boot_seconds=FAKE_BOOT_S, kill_grace=1) as fake,
        get_client(sync_client=True) as client,
    ):
        for gpu in ("NVIDIA RTX A6000", "NVIDIA GeForce RTX 4090"):
            fake.set_stock(gpu, 64, "SECURE")  # room for a whole burst at once
        block_id = RunPodCredentials(api_key="bench-key", api_url=fake.url).save("bench", _sync=True)
        template = RunPodWorker.base_job_template(block_id, command=f"{sys.executable} -m prefect flow-run execute")
        client.create_work_pool(WorkPoolCreate(name="bench-gpu", type="runpod", base_job_template=template))
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("bench-pod-flow"),
            name="bench",
            entrypoint="bench/pod_flow.py:job",
            work_pool_name="bench-gpu",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        )
        with prefect_worker(url, "bench-gpu", "runpod", {}, work / "worker.log", query_seconds=None):
            time.sleep(5)  # the worker's start; not part of any run's latency
            for name, trace in traces(args.jobs).items():
                ours[name] = replay_ours(client, fake, deployment_id, trace, marks, boot)
                print(f"ours, {name}: {len(trace)} runs done", flush=True)

    rows, summary = [], {}
    print(f"\n{'trace':11} {'jobs':>4}  {'submit → first step: median / p90 (s)':>40}  {'GPU-s billed per job':>28}")
    print(f"{'':11} {'':>4}  {'ours':>19} {'OpenWeights':>20}  {'ours':>13} {'OpenWeights':>14}")
    for name, trace in traces(args.jobs).items():
        upstream = simulate_many(trace, boot)
        ours_latency = [latency for latency, _ in ours[name]]
        ours_gpu_s = sum(billed for _, billed in ours[name]) / len(trace)
        theirs_latency = upstream.first_step_latencies()
        theirs_gpu_s = upstream.gpu_seconds_per_job()
        print(
            f"{name:11} {len(trace):>4}  {statistics.median(ours_latency):8.1f} / {p90(ours_latency):6.1f}"
            f"   {statistics.median(theirs_latency):8.1f} / {p90(theirs_latency):6.1f}"
            f"  {ours_gpu_s:13.0f} {theirs_gpu_s:14.0f}   ({len(upstream.pods) / SEEDS:g} upstream pods)"
        )
        summary[name] = {
            "ours_first_step_s": [round(x, 2) for x in ours_latency],
            "upstream_first_step_s": [round(x, 2) for x in theirs_latency],
            "ours_gpu_s_per_job": round(ours_gpu_s, 1),
            "upstream_gpu_s_per_job": round(theirs_gpu_s, 1),
            "upstream_pods_per_trace": len(upstream.pods) / SEEDS,
        }
        median_ours, median_theirs = round(statistics.median(ours_latency), 2), statistics.median(theirs_latency)
        rows.append(
            row(
                f"{name}: submit → first step, median",
                median_ours,
                round(median_theirs, 2),
                "s",
                "ratio ≤ 1.0",
                median_ours <= median_theirs,
            )
        )
        rows.append(
            row(
                f"{name}: GPU-s billed per job",
                round(ours_gpu_s, 1),
                round(theirs_gpu_s, 1),
                "s",
                "ratio ≤ 1.0",
                ours_gpu_s <= theirs_gpu_s,
            )
        )
    print(json.dumps({"boot_s": boot.seconds, "traces": summary}))
    emit("worker", rows)


if __name__ == "__main__":
    main()

"""Submit → first step and GPU-seconds billed per job, our `runpod` worker against OpenWeights' cluster manager,
on the same job traces (bench/traces.py: sparse, a burst of sequential short jobs, a parallel burst).

    .venv/bin/python bench/worker.py [--jobs 10] [--boot-pull 90] [--boot-start 10] [--keep-warm 60]

Ours, measured: a Prefect server (SQLite, loopback), FakeRunPod, and `prefect worker start --type runpod` at its
defaults (a 2 s work-pool poll, a 2 s run/pod watch); every pod runs docker/entrypoint.sh as the images do (its GPU
health check, then the command, or the warm agent with hand-off) and a real `prefect flow-run execute` of
bench/pod_flow.py:job, which writes the moment its body starts (the job's first step) and then works. Each trace
is replayed as submitted: all at once for the parallel burst, each job once the previous one's run is final for
the sequential burst. Without hand-off our worker keeps nothing between runs (a pod per run), so the sparse
trace's 30-minute gaps are replayed as a few seconds: they cannot change a run's figures.

With warm hand-off (`keep_warm_seconds` = --keep-warm, a second deployment on the same worker, ow_prefect/workers/
handoff.py) the sparse and sequential traces are replayed again: the sequential one as it is (its 5 s gaps are real
gaps, and so is the warm time of its last pod); the sparse one with gaps of keep-warm + 5 s, which like its real
30 minutes are longer than the warm time (what a pod does then does not depend on how much longer). A run handed a
warm pod boots nothing: its figures are measured as they are; a new pod's boot is modelled as below.

The pods boot in FakeRunPod's `boot_seconds` (1 s) and work 1 s; the boot model (bench/traces.BootModel: image
pull + container start, stated there) and each trace job's work are then put in their place: submit → first
step = measured − 1 s + boot (measured as is on a handed-over pod); billed = Σ over pods (measured create →
delete − 1 s + boot) + Σ over jobs (work − 1 s). The worker only waits
through a boot and a run (it polls; nothing it does depends on their length), so they add one to one.

OpenWeights, simulated (bench/upstream_sim.py, which cites the files and commit it follows): its manager's
15 s loop, 8 workers at most, a worker's 5 s job poll, its pods kept until 600 s after their creation and
300 s after their last run; the same boot model; a job's first step the moment a worker takes it; 20 phases of
its loop against the trace, pooled.

Prints per trace: median and p90 of submit → first step, GPU-seconds billed per job and pods created, side by side.

`--fine-tunes N` adds the sequential burst as N real fine-tunes (`ow.fine_tuning.create`, the `finetune` flow on a
tiny local Llama, each with its own seed so that each is a new job), hand-off off and then on: here the job's
first step is the trainer's (the run's first `step 1/…` log line) and its work is real (imports, training,
storing the adapter), so only the boot is modelled. The upstream simulation replays the same burst with the
median of our runs' flow durations as each job's work, its first step the moment a worker takes the job (a few
seconds in its favour: its own imports and model load are not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import emit, row  # noqa: E402
from bench.traces import BootModel, TraceJob, traces  # noqa: E402
from bench.upstream_sim import simulate_many  # noqa: E402

ENTRYPOINT = str(ROOT / "docker" / "entrypoint.sh")  # as in the images: the health check, then the command or agent
FAKE_BOOT_S = 1.0
FAKE_WORK_S = 1.0
SPARSE_GAP_S = 3.0
SEEDS = 20  # upstream_sim.simulate_many's default: the manager's loop phase sampled 20 times
HANDOFF_TRACES = ("sparse", "sequential")  # replayed again with hand-off (the parallel burst has nothing to hand on)


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1] if len(samples) > 1 else samples[0]


@dataclass
class Replay:
    latencies: list[float]  # submit → first step per job, boot modelled
    gpu_s_per_job: float  # billed, boot and work modelled
    pods: int  # pods created
    handed_over: int  # runs that got a warm pod


def replay_ours(client, fake, deployment_id, trace: list[TraceJob], marks: Path, boot: BootModel, gap: float):
    """Run the trace through the worker (a sparse trace's gaps replayed as `gap` seconds); its figures with the
    boot and the work modelled."""

    def submit():
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"work_s": FAKE_WORK_S})
        return run.id, client.read_flow_run(run.id).created.timestamp()

    def wait(check, what: str, timeout=300):
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                sys.exit(f"{what} within {timeout} s")
            time.sleep(0.2)

    def final(run_ids) -> bool:
        return all(client.read_flow_run(run_id).state.is_final() for run_id in run_ids)

    submitted = {}
    if all(job.at == 0 for job in trace):  # the parallel burst: everything at once
        for _ in trace:
            run_id, at = submit()
            submitted[run_id] = at
        wait(lambda: final(submitted), f"runs {list(submitted)} did not end")
    else:  # one after another, each once the previous one's run is final
        for job in trace:
            time.sleep(job.after if job.after is not None else gap)
            run_id, at = submit()
            submitted[run_id] = at
            wait(lambda run_id=run_id: final([run_id]), f"run {run_id} did not end")
    names = {f"ow-{run_id}" for run_id in submitted}
    pods = [p for p in list(fake.pods.values()) if p.name in names]
    wait(lambda: all(p.deleted_at for p in pods), "the trace's pods were not deleted")
    latencies, handed = [], 0
    for run_id, submitted_at in submitted.items():
        first_step = float((marks / str(run_id)).read_text())
        pod_id = (client.read_flow_run(run_id).infrastructure_pid or "").removeprefix("runpod::")
        warm = fake.pods[pod_id].name != f"ow-{run_id}"
        handed += warm
        latencies.append(first_step - submitted_at - (0.0 if warm else FAKE_BOOT_S - boot.seconds))
    billed = sum((p.deleted_at - p.created_at).total_seconds() - FAKE_BOOT_S + boot.seconds for p in pods)
    billed += sum(job.work_s - FAKE_WORK_S for job in trace)
    return Replay(latencies, billed / len(trace), len(pods), handed)


def replay_finetunes(
    client, fake, trace: list[TraceJob], suffix: str, model: str, data_id: str, boot: BootModel, seed: int
):
    """The sequential burst as real fine-tunes, submitted through the SDK to `finetune/sft{suffix}`; figures as in
    `replay_ours` with the first step read from the run's logs and the work left as it was. Seeds from `seed` on:
    a job equal to one done before would be its stored result at once (job identity), not a fine-tune."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from ow_prefect import OpenWeights

    os.environ["OW_DEPLOYMENT_SUFFIX"] = suffix
    ow = OpenWeights()
    runs = []
    for i, job in enumerate(trace):
        time.sleep(job.after or 0.0)
        submitted = ow.fine_tuning.create(
            model=model, training_file=data_id, max_steps=30, seed=seed + i, merge_before_push=False, logging_steps=1
        )
        deadline = time.monotonic() + 600
        while not (run := client.read_flow_run(submitted.flow_run_id)).state.is_final():
            if time.monotonic() > deadline:
                sys.exit(f"fine-tune {submitted.id} (run {run.id}) did not end within 600 s")
            time.sleep(0.2)
        if not run.state.is_completed():
            sys.exit(f"fine-tune {submitted.id} ended {run.state.name}: {run.state.message}")
        runs.append(run)
    names = {f"ow-{run.id}" for run in runs}
    pods = [p for p in list(fake.pods.values()) if p.name in names]
    deadline = time.monotonic() + 300
    while not all(p.deleted_at for p in pods):
        if time.monotonic() > deadline:
            sys.exit("the fine-tunes' pods were not deleted within 300 s")
        time.sleep(0.2)
    latencies, durations, handed = [], [], 0
    for run in runs:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        first = min(log.timestamp for log in logs if log.message.startswith("step "))
        warm = fake.pods[(run.infrastructure_pid or "").removeprefix("runpod::")].name != f"ow-{run.id}"
        handed += warm
        latencies.append((first - run.created).total_seconds() - (0.0 if warm else FAKE_BOOT_S - boot.seconds))
        durations.append((run.end_time - run.start_time).total_seconds())
    billed = sum((p.deleted_at - p.created_at).total_seconds() - FAKE_BOOT_S + boot.seconds for p in pods)
    return Replay(latencies, billed / len(trace), len(pods), handed), statistics.median(durations)


def deploy_finetunes(client, keep_warm: int) -> dict[int, str]:
    """`finetune/sft-bench-k<keep>` on the bench pool, hand-off off and on; the suffix of each."""
    from prefect.flows import load_flow_from_entrypoint

    entrypoint = "flows/finetune/flow.py:finetune"
    flow = load_flow_from_entrypoint(str(ROOT / entrypoint))
    suffixes = {}
    for keep in (0, keep_warm):
        suffixes[keep] = f"-bench-k{keep}"
        client.create_deployment(
            flow_id=client.create_flow_from_name(flow.name),
            name=f"sft{suffixes[keep]}",
            entrypoint=entrypoint,
            work_pool_name="bench-gpu",
            job_variables={"keep_warm_seconds": keep, "env": {"OW_TRAIN_BACKEND": "transformers"}},
            parameter_openapi_schema=flow.parameters.model_dump(mode="json"),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        )
    return suffixes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10, help="jobs per burst (the sparse trace has half)")
    parser.add_argument("--boot-pull", type=float, default=BootModel.pull_s)
    parser.add_argument("--boot-start", type=float, default=BootModel.start_s)
    parser.add_argument("--keep-warm", type=int, default=60, help="keep_warm_seconds of the hand-off replays")
    parser.add_argument(
        "--fine-tunes", type=int, default=0, help="also replay the sequential burst as this many real fine-tunes"
    )
    parser.add_argument("--only-fine-tunes", action="store_true", help="skip the stand-in flow's traces")
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
    from ow_prefect.testing.fake_runpod import FakeRunPod, default_image_env
    from ow_prefect.testing.servers import prefect_server, prefect_worker
    from ow_prefect.workers.runpod import RunPodWorker

    image_env = {**default_image_env(), "OW_BENCH_MARKS": str(marks)}  # the pods' flow marks its first step there
    print(f"boot model: {boot.pull_s:g} s image pull + {boot.start_s:g} s container start = {boot.seconds:g} s")
    ours = {}
    with (
        prefect_server(work / "prefect-server") as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
        FakeRunPod(
            api_key="bench-key", boot_seconds=FAKE_BOOT_S, kill_grace=1, image_env=image_env, entrypoint=ENTRYPOINT
        ) as fake,
        get_client(sync_client=True) as client,
    ):
        for gpu in ("NVIDIA RTX A6000", "NVIDIA GeForce RTX 4090"):
            fake.set_stock(gpu, 64, "SECURE")  # room for a whole burst at once
        block_id = RunPodCredentials(api_key="bench-key", api_url=fake.url).save("bench", _sync=True)
        template = RunPodWorker.base_job_template(block_id, command=f"{sys.executable} -m prefect flow-run execute")
        client.create_work_pool(WorkPoolCreate(name="bench-gpu", type="runpod", base_job_template=template))
        deployments = {
            keep: client.create_deployment(
                flow_id=client.create_flow_from_name("bench-pod-flow"),
                name=f"bench-keep-warm-{keep}",
                entrypoint="bench/pod_flow.py:job",
                work_pool_name="bench-gpu",
                job_variables={"keep_warm_seconds": keep},
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
            )
            for keep in (0, args.keep_warm)
        }
        finetunes = {}
        if args.fine_tunes:
            from ow_prefect import OpenWeights
            from ow_prefect.testing.tiny_model import build_tiny_model, sample_conversations, write_jsonl

            model = str(build_tiny_model(work / "tiny-model"))
            rows_file = write_jsonl(sample_conversations(128), work / "train.jsonl")
            data_id = OpenWeights().files.upload(rows_file, "conversations").id
            suffixes = deploy_finetunes(client, args.keep_warm)
        with prefect_worker(url, "bench-gpu", "runpod", {}, work / "worker.log", query_seconds=None):
            time.sleep(5)  # the worker's start; not part of any run's latency
            if args.fine_tunes:
                burst = traces(args.fine_tunes)["sequential"]
                for n, (keep, suffix) in enumerate(suffixes.items()):
                    label = "fine-tunes" + ("+handoff" if keep else "")
                    seed = 1000 * (n + 1)
                    finetunes[label] = replay_finetunes(client, fake, burst, suffix, model, data_id, boot, seed)
                    print(f"ours, {label}: {len(burst)} fine-tunes done", flush=True)
            for name, trace in ({} if args.only_fine_tunes else traces(args.jobs)).items():
                ours[name] = replay_ours(client, fake, deployments[0], trace, marks, boot, SPARSE_GAP_S)
                print(f"ours, {name}: {len(trace)} runs done", flush=True)
            for name in () if args.only_fine_tunes else HANDOFF_TRACES:
                trace, warm = traces(args.jobs)[name], deployments[args.keep_warm]
                gap = args.keep_warm + SPARSE_GAP_S + 2  # longer than the warm time, as the trace's 30 minutes
                ours[f"{name}+handoff"] = replay_ours(client, fake, warm, trace, marks, boot, gap)
                print(f"ours with hand-off, {name}: {len(trace)} runs done", flush=True)

    rows, summary = [], {}
    print(f"\nhand-off: keep_warm_seconds {args.keep_warm}")
    print(f"\n{'trace':20} {'jobs':>4}  {'submit → first step: median / p90 (s)':>40}  {'GPU-s billed per job':>28}")
    print(f"{'':20} {'':>4}  {'ours':>19} {'OpenWeights':>20}  {'ours':>13} {'OpenWeights':>14}  pods: ours / OW")
    work_s = {}  # the fine-tunes' upstream trace: each job works the median of our runs' flow durations
    for name, (replay, duration) in finetunes.items():
        ours[name] = replay
        work_s.setdefault("fine-tunes", duration)
    for name, replay in ours.items():
        if name.startswith("fine-tunes"):
            burst = traces(args.fine_tunes)["sequential"]
            trace = [TraceJob(work_s=work_s["fine-tunes"], at=j.at, after=j.after) for j in burst]
        else:
            trace = traces(args.jobs)[name.removesuffix("+handoff")]
        upstream = simulate_many(trace, boot)
        ours_latency, ours_gpu_s = replay.latencies, replay.gpu_s_per_job
        theirs_latency = upstream.first_step_latencies()
        theirs_gpu_s = upstream.gpu_seconds_per_job()
        print(
            f"{name:20} {len(trace):>4}  {statistics.median(ours_latency):8.1f} / {p90(ours_latency):6.1f}"
            f"   {statistics.median(theirs_latency):8.1f} / {p90(theirs_latency):6.1f}"
            f"  {ours_gpu_s:13.0f} {theirs_gpu_s:14.0f}   {replay.pods:>5} / {len(upstream.pods) / SEEDS:g}"
        )
        summary[name] = {
            "ours_first_step_s": [round(x, 2) for x in ours_latency],
            "upstream_first_step_s": [round(x, 2) for x in theirs_latency],
            "ours_gpu_s_per_job": round(ours_gpu_s, 1),
            "upstream_gpu_s_per_job": round(theirs_gpu_s, 1),
            "ours_pods": replay.pods,
            "ours_handed_over": replay.handed_over,
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
    for name in ("sequential", "fine-tunes"):
        if name not in ours:
            continue
        on, off = ours[f"{name}+handoff"], ours[name]
        rows.append(row(f"{name}: pods created, hand-off on vs off", on.pods, off.pods, "pods", "", None))
        rows.append(
            row(
                f"{name}: submit → first step median, hand-off on vs off",
                round(statistics.median(on.latencies), 2),
                round(statistics.median(off.latencies), 2),
                "s",
            )
        )
        rows.append(
            row(
                f"{name}: GPU-s billed per job, hand-off on vs off",
                round(on.gpu_s_per_job, 1),
                round(off.gpu_s_per_job, 1),
                "s",
            )
        )
    if "sparse" in ours:  # a pool whose runs do not follow each other pays nothing for hand-off (2%: polls' noise)
        on_s, off_s = ours["sparse+handoff"].gpu_s_per_job, ours["sparse"].gpu_s_per_job
        rows.append(
            row(
                "sparse, hand-off on: GPU-s billed per job vs off",
                round(on_s, 1),
                round(off_s, 1),
                "s",
                "ratio ≤ 1.02",
                on_s <= off_s * 1.02,
            )
        )
    print(json.dumps({"boot_s": boot.seconds, "keep_warm_s": args.keep_warm, "traces": summary}))
    emit("worker", rows)


if __name__ == "__main__":
    main()

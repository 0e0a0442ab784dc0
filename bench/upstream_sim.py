"""A simulation of OpenWeights' cluster manager and workers, in virtual time, for bench/worker.py's traces.

Faithful to longtermrisk/openweights at commit 286964fcf0e23d812f8c2ca226c41a3914eca27d:
- openweights/cluster/org_manager.py, `OrganizationManager.manage_cluster`: a loop every POLL_INTERVAL (15 s)
  that (1) when jobs are pending, starts `min(pending − starting workers, MAX_WORKERS (8) − workers whose row is
  active, starting or shutdown)` pods (`scale_workers`; a new worker's row is `starting` until its process
  registers); (2) marks `terminated` a worker silent for UNRESPONSIVE_THRESHOLD (120 s; STARTUP_THRESHOLD for a
  starting one) (`clean_up_unresponsive_workers`); (3) sets `shutdown` on each worker created at least
  STARTUP_THRESHOLD (600 s) ago whose last run ended more than IDLE_THRESHOLD (300 s) ago, or that has no run
  at all (`get_idle_workers`).
- openweights/worker/main.py (commit a44bc148d7d419323923a4e6d3f9a7d90f9808eb, the newest the index stores):
  the worker registers `active` once its process runs, looks for a pending job at once and then every 5 s,
  takes a random suitable one (`_find_job` shuffles), runs it, and looks again as soon as it ends; its health
  loop (every 5 s) sees `shutdown`, and the worker terminates its own pod and stops pinging.

Where upstream's timing is not in its code (the pod's boot, the job script's own start), the simulation takes
the bench's boot model and gives upstream the benefit of the doubt: a job's first step is the moment a worker
acquires it, with no database round trips, no model download and no script start.

`simulate(trace, boot)` returns what bench/worker.py reports for our worker too: per job, submit → first step;
per pod, create → terminate (billed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from bench.traces import BootModel, TraceJob

POLL_INTERVAL = 15.0
IDLE_THRESHOLD = 300.0
STARTUP_THRESHOLD = 600.0
UNRESPONSIVE_THRESHOLD = 120.0
MAX_WORKERS = 8
WORKER_POLL = 5.0  # worker/main.py: `time.sleep(5)` between job searches and in the health loop
STEP = 0.25  # the simulation's clock tick


@dataclass
class SimJob:
    index: int
    work_s: float
    submitted: float | None = None
    first_step: float | None = None
    finished: float | None = None


@dataclass
class SimWorker:
    created: float  # row and pod created at the manager's tick
    ready: float  # boot done: the worker process registers `active`
    health_phase: float  # when in each 5 s its health loop looks at its row
    status: str = "starting"
    job: SimJob | None = None
    next_poll: float = 0.0
    last_run_end: float | None = None  # the `updated_at` of its last run
    has_run: bool = False
    terminated: float | None = None  # the pod's end (billing stops)
    silent_since: float | None = None  # stopped pinging (its process ended with the pod)
    jobs: list[int] = field(default_factory=list)

    def billed(self, end: float) -> float:
        return (self.terminated if self.terminated is not None else end) - self.created


@dataclass
class Result:
    jobs: list[SimJob]
    pods: list[SimWorker]
    end: float

    def first_step_latencies(self) -> list[float]:
        return [job.first_step - job.submitted for job in self.jobs]

    def gpu_seconds_per_job(self) -> float:
        return sum(pod.billed(self.end) for pod in self.pods) / len(self.jobs)  # (every pod has ended)


def simulate(trace: list[TraceJob], boot: BootModel, seed: int = 0, horizon: float = 6 * 3600) -> Result:
    """Run the trace through the manager and its workers until every job is done and every pod is gone."""
    rng = random.Random(seed)
    jobs = [SimJob(i, job.work_s) for i, job in enumerate(trace)]
    workers: list[SimWorker] = []
    next_manager = rng.uniform(0, POLL_INTERVAL)  # the manager's loop runs independently of the trace
    t = 0.0
    while t < horizon:
        _submit(trace, jobs, t)
        pending = [job for job in jobs if job.submitted is not None and job.first_step is None]
        # workers: boot, finish, look for work, obey shutdown
        for worker in workers:
            if worker.terminated is not None:
                continue
            if worker.status == "starting" and t >= worker.ready:
                worker.status, worker.next_poll = "active", t
            if worker.job and t >= worker.job.first_step + worker.job.work_s:
                worker.job.finished = t
                worker.last_run_end, worker.job, worker.next_poll = t, None, t
            if worker.status == "active" and worker.job is None and t >= worker.next_poll:
                if pending:
                    job = pending.pop(rng.randrange(len(pending)))
                    job.first_step, worker.job, worker.has_run = t, job, True
                    worker.jobs.append(job.index)
                else:
                    worker.next_poll = t + WORKER_POLL
            if worker.status == "shutdown" and _tick(t, worker.health_phase):
                worker.terminated = worker.silent_since = t
        if t >= next_manager:
            _manage(workers, pending, t, boot, rng)
            next_manager += POLL_INTERVAL
        if all(job.finished is not None for job in jobs) and all(w.terminated is not None for w in workers):
            return Result(jobs, workers, t)
        t = round(t + STEP, 6)
    raise RuntimeError(f"the trace did not finish within {horizon} s of simulated time")


def simulate_many(trace: list[TraceJob], boot: BootModel, seeds: int = 20) -> Result:
    """`simulate` over `seeds` phases of the manager's loop and of the workers' polls (where in its 15 s cycle a
    job arrives is chance), pooled: every run's jobs and pods in one Result, so medians and per-job GPU-seconds
    are over all of them."""
    runs = [simulate(trace, boot, seed=seed) for seed in range(seeds)]
    return Result([job for run in runs for job in run.jobs], [pod for run in runs for pod in run.pods], 0.0)


def _submit(trace: list[TraceJob], jobs: list[SimJob], t: float) -> None:
    for i, (spec, job) in enumerate(zip(trace, jobs, strict=True)):
        if job.submitted is not None:
            continue
        previous_done = jobs[i - 1].finished if i else None
        at = spec.at if spec.at is not None else (previous_done + spec.after if previous_done is not None else None)
        if at is not None and t >= at:
            job.submitted = t


def _tick(t: float, phase: float) -> bool:
    """True at the one clock tick in each WORKER_POLL period that falls on `phase`."""
    return (t - phase) % WORKER_POLL < STEP


def _manage(workers: list[SimWorker], pending: list[SimJob], t: float, boot: BootModel, rng: random.Random) -> None:
    rows = [w for w in workers if w.status in ("active", "starting", "shutdown")]
    if pending:  # scale_workers (one hardware group: the trace's jobs have no allowed_hardware)
        starting = sum(1 for w in rows if w.status == "starting")
        for _ in range(min(len(pending) - starting, MAX_WORKERS - len(rows))):
            workers.append(SimWorker(created=t, ready=t + boot.seconds, health_phase=rng.uniform(0, WORKER_POLL)))
    for worker in rows:  # clean_up_unresponsive_workers: a shut-down worker no longer pings
        if worker.silent_since is not None and t - worker.silent_since > UNRESPONSIVE_THRESHOLD:
            worker.status = "terminated"
    for worker in rows:  # get_idle_workers, then status `shutdown`
        if worker.status not in ("active", "starting") or t - worker.created < STARTUP_THRESHOLD:
            continue
        idle = worker.job is None and (not worker.has_run or t - worker.last_run_end > IDLE_THRESHOLD)
        if idle:
            worker.status = "shutdown"

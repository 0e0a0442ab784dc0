"""bench/upstream_sim.py: the simulation of OpenWeights' cluster manager that bench/worker.py compares our worker
with keeps upstream's thresholds (15 s loop, 8 workers, 600 s startup and 300 s idle before a pod goes, 5 s
worker poll), on the traces of bench/traces.py."""

import pytest

from bench.traces import BootModel, TraceJob, parallel_burst, sequential_burst
from bench.upstream_sim import IDLE_THRESHOLD, MAX_WORKERS, POLL_INTERVAL, STARTUP_THRESHOLD, simulate, simulate_many

BOOT = BootModel(pull_s=90, start_s=10)


def test_a_lone_job_waits_for_a_manager_tick_and_a_boot_and_its_pod_idles_until_the_thresholds():
    result = simulate([TraceJob(work_s=60, at=0)], BOOT, seed=1)
    (latency,) = result.first_step_latencies()
    assert BOOT.seconds <= latency <= BOOT.seconds + POLL_INTERVAL
    (pod,) = result.pods
    # kept until created + 600 s (the job ended long before) and 300 s after its run, then a poll or two
    assert STARTUP_THRESHOLD <= pod.billed(result.end) <= STARTUP_THRESHOLD + POLL_INTERVAL + 5
    assert pod.billed(result.end) >= latency + 60 + IDLE_THRESHOLD


def test_sequential_jobs_reuse_the_warm_pod_and_a_parallel_burst_is_capped_at_eight_workers():
    sequential = simulate(sequential_burst(10), BOOT)
    assert len(sequential.pods) == 1 and sorted(sequential.first_step_latencies())[:9] == [0.0] * 9
    parallel = simulate(parallel_burst(10), BOOT)
    assert len(parallel.pods) == MAX_WORKERS
    waits = sorted(parallel.first_step_latencies())
    assert waits[-1] >= waits[0] + 300  # two jobs wait for a worker to finish its first one


def test_a_trace_job_is_either_timed_or_follows_the_previous_one():
    with pytest.raises(ValueError, match="either"):
        TraceJob(work_s=1, at=0, after=1)


def test_pooled_phases_sample_where_in_the_managers_loop_a_job_arrives():
    pooled = simulate_many([TraceJob(work_s=60, at=0)], BOOT, seeds=20)
    latencies = pooled.first_step_latencies()
    assert len(latencies) == 20 and len(pooled.pods) == 20
    assert max(latencies) - min(latencies) > POLL_INTERVAL / 2  # not one phase twenty times

"""Job traces and the pod boot-delay model that bench/worker.py replays, on our worker and on the simulation of
OpenWeights' cluster manager (bench/upstream_sim.py). Kept apart so that later benches (a warm pod hand-off, a
pool of idle pods) replay the same traces against the same baseline.

A trace is a list of jobs; each is submitted either at a fixed time (`at`, seconds from the trace's start) or
`after` seconds once the previous job of the trace finished (a researcher's loop that waits for each result),
and then works `work_s` seconds on its GPU (from its first step to its end).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TraceJob:
    work_s: float
    at: float | None = None  # submitted at this time, or ...
    after: float | None = None  # ... this long after the previous job finished

    def __post_init__(self) -> None:
        if (self.at is None) == (self.after is None):
            raise ValueError("a trace job has either `at` or `after`")


@dataclass(frozen=True)
class BootModel:
    """From the create request to the container's command starting: the image pull, then the container's start.
    Neither RunPod nor OpenWeights publishes a figure; these defaults are a stated assumption (a ~10 GB CUDA
    image pulled at a few hundred MB/s on a host without it cached, then the container's start), and the bench
    takes others on its command line."""

    pull_s: float = 90.0
    start_s: float = 10.0

    @property
    def seconds(self) -> float:
        return self.pull_s + self.start_s


def sparse(n: int = 4) -> list[TraceJob]:
    """Jobs far apart (30 min), longer than any idle threshold: every job finds no warm pod."""
    return [TraceJob(work_s=300, at=i * 1800.0) for i in range(n)]


def sequential_burst(n: int = 10) -> list[TraceJob]:
    """n short jobs, each submitted 5 s after the previous one finished (a sweep run one after another)."""
    return [TraceJob(work_s=60, at=0.0)] + [TraceJob(work_s=60, after=5.0) for _ in range(n - 1)]


def parallel_burst(n: int = 10) -> list[TraceJob]:
    """n jobs submitted at once (a sweep submitted in one go)."""
    return [TraceJob(work_s=300, at=0.0) for _ in range(n)]


def traces(n: int = 10) -> dict[str, list[TraceJob]]:
    return {"sparse": sparse(max(2, n // 2)), "sequential": sequential_burst(n), "parallel": parallel_burst(n)}

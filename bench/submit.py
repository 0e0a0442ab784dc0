"""Submission latency of the SDK against a raw Prefect baseline, measured in one run on one local server.

    .venv/bin/python bench/submit.py [--n 30]

Starts a real Prefect server (SQLite, loopback) and registers the deployments on a pool with no worker, so
only submission is timed. Prints medians and ratios:
- baseline: `create_flow_run_from_deployment` on an open client (what a hand-written script does);
- new job:  `ow.custom.create(...)` with parameters not seen before (validate, hash, look up, create);
- duplicate: the same call again (validate, hash, look up, return the existing job);
- 50 concurrent identical submissions: wall time against 50 concurrent raw creates with one idempotency key,
  and how many flow runs they made (must be 1). SQLite serialises the writes: expect seconds, not ms.
"""

from __future__ import annotations

import argparse
import asyncio
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


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=30, help="submissions per measurement")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ow-bench-"))
    os.environ.update(OW_HOME=str(work / "ow"), PREFECT_HOME=str(work / "prefect-client"))

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.register import register
    from ow_prefect import AsyncOpenWeights, OpenWeights
    from ow_prefect.jobs.submit import job_tag
    from ow_prefect.testing.servers import prefect_server

    with prefect_server(work / "prefect-server") as url, temporary_settings(updates={PREFECT_API_URL: url}):
        register(pool="bench-no-worker", create_pool="process")
        with get_client(sync_client=True) as client:
            deployment_id = client.read_deployment_by_name("custom/run").id
            client.create_flow_run_from_deployment(deployment_id, parameters={"entrypoint": "warm-up"})
            baseline = []
            for i in range(args.n):
                start = time.perf_counter()
                client.create_flow_run_from_deployment(deployment_id, parameters={"entrypoint": f"echo raw {i}"})
                baseline.append(time.perf_counter() - start)

        ow = OpenWeights()
        ow.custom.create(entrypoint="echo warm-up")
        new, duplicate = [], []
        for i in range(args.n):
            start = time.perf_counter()
            ow.custom.create(entrypoint=f"echo sdk {i}")
            new.append(time.perf_counter() - start)
        for _ in range(args.n):
            start = time.perf_counter()
            ow.custom.create(entrypoint="echo sdk 0")
            duplicate.append(time.perf_counter() - start)

        async def raw_concurrent() -> float:
            async with get_client() as client:
                start = time.perf_counter()
                await asyncio.gather(
                    *[
                        client.create_flow_run_from_deployment(
                            deployment_id, parameters={"entrypoint": "echo raw concurrent"}, idempotency_key="bench-raw"
                        )
                        for _ in range(50)
                    ]
                )
                return time.perf_counter() - start

        raw_concurrent_s = asyncio.run(raw_concurrent())

        async def concurrent() -> tuple[str, float]:
            aow = AsyncOpenWeights()
            start = time.perf_counter()
            jobs = await asyncio.gather(*[aow.custom.create(entrypoint="echo concurrent") for _ in range(50)])
            return jobs[0].id, time.perf_counter() - start

        job_id, concurrent_s = asyncio.run(concurrent())
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[job_tag(job_id)])))

    result = {
        "n": args.n,
        "baseline_create_flow_run_ms": median_ms(baseline),
        "sdk_new_job_ms": median_ms(new),
        "sdk_duplicate_ms": median_ms(duplicate),
        "ratio_new_vs_baseline": round(statistics.median(new) / statistics.median(baseline), 2),
        "ratio_duplicate_vs_baseline": round(statistics.median(duplicate) / statistics.median(baseline), 2),
        "concurrent_identical_submissions": 50,
        "baseline_concurrent_wall_s": round(raw_concurrent_s, 2),
        "sdk_concurrent_wall_s": round(concurrent_s, 2),
        "ratio_concurrent_vs_baseline": round(concurrent_s / raw_concurrent_s, 2),
        "flow_runs_after_concurrent": len(runs),
    }
    print(json.dumps(result, indent=2))
    new, base, dup = result["sdk_new_job_ms"], result["baseline_create_flow_run_ms"], result["sdk_duplicate_ms"]
    emit(
        "submit",
        [
            row("new job, median", new, base, "ms", "ratio ≤ 1.5", new <= 1.5 * base),
            row("duplicate job, median", dup, base, "ms", "ratio ≤ 1.0", dup <= base),
            row(
                "50 concurrent identical",
                result["sdk_concurrent_wall_s"],
                result["baseline_concurrent_wall_s"],
                "s",
                "ratio ≤ 1.5",
                result["sdk_concurrent_wall_s"] <= 1.5 * result["baseline_concurrent_wall_s"],
            ),
            row("flow runs after 50 identical", len(runs), 1, "", "= 1", len(runs) == 1),
        ],
    )


if __name__ == "__main__":
    main()

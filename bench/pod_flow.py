"""The flow bench/worker.py runs in fake RunPod pods: it marks when its body starts (the job's first step) in
$OW_BENCH_MARKS/<flow run id>, then works `work_s` seconds."""

import os
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run


@flow(name="bench-pod-flow")
def job(work_s: float = 1.0) -> str:
    started = time.time()
    marks = os.environ.get("OW_BENCH_MARKS")
    if marks:
        Path(marks, flow_run.get_id()).write_text(repr(started))
    time.sleep(work_s)
    return "done"

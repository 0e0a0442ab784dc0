"""Small flows that the RunPod worker tests deploy on a `runpod` pool (they run inside fake pods)."""

import time

from prefect import flow


@flow(name="pod-sleeper", log_prints=True)
def sleeper(seconds: float = 1.0, fail: bool = False) -> str:
    print(f"sleeping {seconds} s")
    time.sleep(seconds)
    if fail:
        raise RuntimeError("asked to fail")
    return "done"

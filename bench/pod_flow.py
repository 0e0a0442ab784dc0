"""The flow bench/worker.py runs in fake RunPod pods: it only has to start and end."""

from prefect import flow


@flow(name="bench-pod-flow")
def quick() -> str:
    return "done"

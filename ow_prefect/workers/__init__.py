"""Prefect worker types of ow_prefect, registered through the `prefect.collections` entry point.

`ow_prefect/__init__.py` imports this package whenever Prefect is loaded; importing a worker module registers
its type, so `prefect work-pool create --type runpod` and `prefect worker start --type runpod` find it.
"""

from ow_prefect.workers.runpod import RunPodWorker

__all__ = ["RunPodWorker"]

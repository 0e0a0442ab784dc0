"""Prefect worker types of ow_prefect: the `prefect.collections` entry point (pyproject.toml).

Prefect imports this package where it loads its collections (a worker start, `prefect work-pool create`, its
server, the first `Block.load`); importing a worker module registers its type, so `prefect work-pool create
--type runpod` and `prefect worker start --type runpod` find it, and the RunPod credentials block with it.
Nothing else imports it: a flow run, `ow` and the SDK do not pay for it (~0.2 s of CPU: Prefect's worker and
runner modules; measured: a flow module imported after Prefect, 2.50 → 2.32 CPU-s).
"""

from ow_prefect.workers.runpod import RunPodWorker

__all__ = ["RunPodWorker"]

"""Prefect worker types of ow_prefect, registered through the `prefect.collections` entry point.

`ow_prefect/__init__.py` imports this package whenever Prefect is loaded, so a worker module imported
here (``from ow_prefect.workers.runpod import RunPodWorker``) becomes a work-pool type
(``prefect work-pool create --type runpod``). The RunPod worker lands here with its issue.
"""

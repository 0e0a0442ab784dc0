"""The job-variable presets of prefect.yaml's `definitions`, for Python: deploy your own flow with the same image,
GPU memory and CUDA floor as the built-in deployments of that kind.

    from deployments.presets import job_variables
    my_flow.from_source(".", "my_flow.py:train").deploy(
        name="train", work_pool_name="gpu", job_variables=job_variables("gpu_train") | {"min_vram_gb": 80}
    )

Names: gpu_train, gpu_custom, gpu_serve, gpu_api (pool `gpu`, type runpod) and local (pool `local`, type process).
prefect.yaml stays the one place they are written; `runpod_job_variables()` (ow_prefect.workers.runpod) checks any
job variables against the worker's fields before a deploy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def presets(root: Path = ROOT) -> dict[str, dict[str, Any]]:
    """{preset name: {"pool": work pool name, "job_variables": {...}}} from prefect.yaml's definitions."""
    pools = yaml.safe_load((root / "prefect.yaml").read_text())["definitions"]["work_pools"]
    return {
        name: {"pool": spec["name"], "job_variables": dict(spec.get("job_variables") or {})}
        for name, spec in pools.items()
    }


def job_variables(name: str, root: Path = ROOT) -> dict[str, Any]:
    """The job variables of one preset (a copy: change it freely)."""
    known = presets(root)
    if name not in known:
        raise KeyError(f"no preset {name!r} in prefect.yaml's definitions; known: {sorted(known)}")
    return dict(known[name]["job_variables"])

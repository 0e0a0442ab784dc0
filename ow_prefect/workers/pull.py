"""The pull step of prefect.yaml's RunPod deployments: where a pod's flow run finds the project's code.

    pull:
      - ow_prefect.workers.pull.code_directory: {}

In the pod, before the flow loads, it changes to `OW_POD_CODE_DIR` when that is set, else to the image's copy of
the code (/opt/ow_prefect, see docker/Dockerfile). The RunPod worker passes its own `OW_POD_CODE_DIR` to every pod
(a per-deployment or per-run choice goes in the `env` job variable): a checkout that the pods can see — on a
network volume, or this very checkout when the pods are FakeRunPod's local processes (docs/runpod.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from ow_prefect.settings import get_settings

IMAGE_CODE_DIR = "/opt/ow_prefect"  # where docker/Dockerfile puts the code


def code_directory() -> dict[str, str]:
    """Change to the code's directory; fail naming both choices when it is not there."""
    chosen = get_settings().pod_code_dir
    directory = Path(chosen or IMAGE_CODE_DIR)
    if not (directory / "flows").is_dir():
        where = f"OW_POD_CODE_DIR={chosen}" if chosen else f"the image's copy at {IMAGE_CODE_DIR}"
        raise FileNotFoundError(
            f"ow_prefect's code is not in this pod ({where} has no flows/): run the pods from the ow_prefect images "
            "(docker/README.md), or set OW_POD_CODE_DIR on the worker (or in the `env` job variable) to a checkout "
            "the pods can see (docs/runpod.md, 'Where a pod gets the code')"
        )
    os.chdir(directory)
    return {"directory": str(directory)}

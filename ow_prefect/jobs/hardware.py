"""OpenWeights' ``allowed_hardware`` (``["1x L40", "2x H200"]``) as the RunPod worker's job variables.

OpenWeights names GPUs by short names ("A100S", "H100N") and picks a worker whose hardware is in the list. The
RunPod worker here creates a pod per run from ``gpu_types`` (RunPod GPU type ids, most preferred first) and one
``gpu_count``; so the list becomes those two variables, and ``min_vram_gb`` drops to 0 unless the job asked for
memory itself (OpenWeights: "allowed_hardware is the sole selector").
"""

from __future__ import annotations

import re
from typing import Any

from ow_prefect.errors import ParameterError

# OpenWeights' short names -> RunPod GPU type ids (the ids are what RunPod's catalog and our worker use)
OPENWEIGHTS_GPUS: dict[str, str] = {
    "2000Ada": "NVIDIA RTX 2000 Ada Generation",
    "4000Ada": "NVIDIA RTX 4000 Ada Generation",
    "6000Ada": "NVIDIA RTX 6000 Ada Generation",
    "A100": "NVIDIA A100 80GB PCIe",
    "A100S": "NVIDIA A100-SXM4-80GB",
    "A2000": "NVIDIA RTX A2000",
    "A30": "NVIDIA A30",
    "A40": "NVIDIA A40",
    "A4000": "NVIDIA RTX A4000",
    "A4000_SFF": "NVIDIA RTX 4000 SFF Ada Generation",
    "A4500": "NVIDIA RTX A4500",
    "A5000": "NVIDIA RTX A5000",
    "A5000_ADA": "NVIDIA RTX 5000 Ada Generation",
    "A6000": "NVIDIA RTX A6000",
    "B200": "NVIDIA B200",
    "H100": "NVIDIA H100 PCIe",
    "H100N": "NVIDIA H100 NVL",
    "H100S": "NVIDIA H100 80GB HBM3",
    "H200": "NVIDIA H200",
    "L4": "NVIDIA L4",
    "L40": "NVIDIA L40",
    "L40S": "NVIDIA L40S",
    "MI300X": "AMD Instinct MI300X OAM",
    "RTX3090": "NVIDIA GeForce RTX 3090",
    "RTX3090Ti": "NVIDIA GeForce RTX 3090 Ti",
    "RTX4070Ti": "NVIDIA GeForce RTX 4070 Ti",
    "RTX4080": "NVIDIA GeForce RTX 4080",
    "RTX4090": "NVIDIA GeForce RTX 4090",
    "RTX5090": "NVIDIA GeForce RTX 5090",
}
ENTRY_RE = re.compile(r"^\s*(?P<count>[1-8])\s*x\s+(?P<gpu>\S.*?)\s*$")
CLOUD_TYPES = {"SECURE": "SECURE", "COMMUNITY": "COMMUNITY", "ALL": "ANY", "ANY": "ANY"}


def gpu_type_id(name: str) -> str:
    """A RunPod GPU type id for an OpenWeights short name; a RunPod id is returned as it is."""
    return OPENWEIGHTS_GPUS.get(name, name)


def hardware_variables(allowed_hardware: list[str], requires_vram_gb: float | None) -> dict[str, Any]:
    """``gpu_types``, ``gpu_count`` and ``min_vram_gb`` for the RunPod worker, or a ParameterError saying
    what to write."""
    if isinstance(allowed_hardware, str) or not allowed_hardware:
        raise ParameterError(
            f"allowed_hardware={allowed_hardware!r}: give a non-empty list such as ['1x L40', '1x A100']"
        )
    parsed, problems = [], []
    for entry in allowed_hardware:
        match = ENTRY_RE.match(str(entry))
        if not match:
            problems.append(f"{entry!r} is not '<count>x <GPU>' (e.g. '1x A100' or '2x NVIDIA H200')")
        elif gpu_type_id(match["gpu"]) == match["gpu"] and " " not in match["gpu"]:
            problems.append(
                f"{entry!r}: unknown GPU {match['gpu']!r}; use an OpenWeights name "
                f"({', '.join(sorted(OPENWEIGHTS_GPUS))}) or a RunPod GPU type id ('NVIDIA RTX A6000')"
            )
        else:
            parsed.append((entry, int(match["count"]), gpu_type_id(match["gpu"])))
    counts = sorted({count for _, count, _ in parsed})
    if len(counts) > 1:
        fewest = [entry for entry, count, _ in parsed if count == counts[0]]
        problems.append(
            f"entries ask for {counts} GPUs, but a run gets one pod with one GPU count: keep one count, e.g. {fewest}"
        )
    if problems:
        raise ParameterError("allowed_hardware:\n" + "\n".join(f"  - {p}" for p in problems))
    types = list(dict.fromkeys(gpu for _, _, gpu in parsed))
    return {"gpu_types": types, "gpu_count": counts[0], "min_vram_gb": requires_vram_gb or 0}


def cloud_variable(cloud_type: str) -> dict[str, str]:
    """OpenWeights' ``cloud_type`` as the worker's ``cloud`` variable."""
    cloud = CLOUD_TYPES.get(str(cloud_type).upper())
    if cloud is None:
        raise ParameterError(f"cloud_type={cloud_type!r}: use 'SECURE', 'COMMUNITY' or 'ALL'")
    return {"cloud": cloud}

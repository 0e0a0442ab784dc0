"""FakeRunPod's GPUs as its pods see them: a simulated `nvidia-smi` in each GPU pod, healthy unless a test breaks
a GPU type (everywhere, or in one data center):

    fake.gpus.break_type("NVIDIA GeForce RTX 4090", "no_gpu")
    fake.gpus.break_type("NVIDIA RTX A6000", "half_vram", data_center="US-TX-3")
    fake.gpus.clear()                                   # FakeRunPod.reset() does it too

Each GPU pod finds an `nvidia-smi` first on its PATH that answers the way the real one does on a host with the
pod's GPU type and count (`-q -x`, `--query-gpu=...` as CSV, or a short table): the memory RunPod advertises for
the type less what the driver reserves, driver 570.124.06 with the fake hosts' CUDA version. The pod's health
check (ow_prefect/runpod/health.py) reads it through its real code path; `OW_HEALTH_PROBES=nvidia-smi` tells it to
leave torch alone, because torch on this machine is a CPU build (or a real GPU) that knows nothing of the
simulated one. The faults, as RunPod hosts show them:

- `no_gpu`: the driver finds no device ("No devices were found", exit 6): a container that cannot see its GPU;
- `half_vram`: half the type's memory: a host that shares or misreports its GPU;
- `old_driver`: driver 535.183.01 (CUDA 12.2) whatever the catalog says: too old for an image built for 12.8+.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ow_prefect.runpod.health import PROBES_ENV

Fault = Literal["no_gpu", "half_vram", "old_driver"]
FAULTS: tuple[str, ...] = ("no_gpu", "half_vram", "old_driver")
HEALTHY_DRIVER = "570.124.06"
OLD_DRIVER = ("535.183.01", "12.2")
RESERVED_MIB = 434  # what the driver keeps of each GPU's memory (an NVIDIA L4 reports 23034 of 23468 MiB)
NO_DEVICE = ("No devices were found", 6)


class FakeGpus:
    """Which GPU types (and data centers) are broken, and the `nvidia-smi` a pod on them gets."""

    def __init__(self, memory_gb: Mapping[str, int], host_cuda: str) -> None:
        self.memory_gb = dict(memory_gb)
        self.host_cuda = host_cuda
        self._faults: dict[tuple[str, str | None], Fault] = {}

    def break_type(self, gpu_id: str, fault: Fault, data_center: str | None = None) -> None:
        """Make pods of `gpu_id` (in `data_center`, or everywhere) see `fault` from their next container start."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
        if gpu_id not in self.memory_gb:
            raise ValueError(f"unknown GPU type id {gpu_id!r}")
        self._faults[(gpu_id, data_center)] = fault

    def clear(self) -> None:
        self._faults.clear()

    def fault_of(self, gpu_id: str, data_center: str) -> Fault | None:
        return self._faults.get((gpu_id, data_center)) or self._faults.get((gpu_id, None))

    def pod_env(self, workdir: Path, gpu: Mapping[str, Any] | None, data_center: str, env: dict[str, str]) -> dict:
        """The container's environment with this pod's `nvidia-smi` first on its PATH (GPU pods only)."""
        if gpu is None:
            return env
        bin_dir = workdir / ".fake-gpu-bin"
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / "nvidia-smi"
        script.write_text(self.nvidia_smi_script(gpu["id"], gpu.get("count", 1), data_center))
        script.chmod(0o755)
        return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}", PROBES_ENV: "nvidia-smi"}

    def nvidia_smi_script(self, gpu_id: str, count: int, data_center: str) -> str:
        fault = self.fault_of(gpu_id, data_center)
        header = f"#!/usr/bin/env bash\n# FakeRunPod: {count}x {gpu_id} in {data_center}, {fault or 'healthy'}\n"
        if fault == "no_gpu":
            message, code = NO_DEVICE
            return header + f"echo {shlex.quote(message)}\nexit {code}\n"
        driver, cuda = OLD_DRIVER if fault == "old_driver" else (HEALTHY_DRIVER, self.host_cuda)
        memory_mib = self.memory_gb[gpu_id] * 1024 // (2 if fault == "half_vram" else 1) - RESERVED_MIB
        xml = shlex.quote(_xml(gpu_id, count, memory_mib, driver, cuda))
        table = shlex.quote(_table(gpu_id, count, memory_mib, driver, cuda))
        values = f"name) v={shlex.quote(gpu_id)} ;; memory.total) v={memory_mib} ;; driver_version) v={driver} ;;"
        return header + (
            'query=""\n'
            'for arg in "$@"; do case $arg in --query-gpu=*) query=${arg#--query-gpu=} ;; esac; done\n'
            'if [[ " $* " == *" -x "* ]]; then printf %s ' + xml + "\n"
            "elif [[ -n $query ]]; then  # CSV, one line per GPU, without header or units whatever --format says\n"
            f"  for ((i = 0; i < {count}; i++)); do\n"
            '    line=""\n'
            '    IFS=, read -ra fields <<<"$query"\n'
            '    for field in "${fields[@]}"; do\n'
            f'      case $field in index) v=$i ;; {values} *) v="[N/A]" ;; esac\n'
            '      line+="${line:+, }$v"\n'
            "    done\n"
            '    echo "$line"\n'
            "  done\n"
            "else printf %s " + table + "\nfi\n"
        )


def _xml(gpu_id: str, count: int, memory_mib: int, driver: str, cuda: str) -> str:
    gpus = "".join(
        f'\t<gpu id="00000000:{index + 1:02X}:00.0">\n'
        f"\t\t<product_name>{gpu_id}</product_name>\n"
        f"\t\t<fb_memory_usage>\n\t\t\t<total>{memory_mib} MiB</total>\n\t\t\t<reserved>{RESERVED_MIB} MiB</reserved>\n"
        f"\t\t\t<used>1 MiB</used>\n\t\t\t<free>{memory_mib - 1} MiB</free>\n\t\t</fb_memory_usage>\n"
        "\t\t<bar1_memory_usage>\n\t\t\t<total>32768 MiB</total>\n\t\t</bar1_memory_usage>\n"
        "\t</gpu>\n"
        for index in range(count)
    )
    return (
        '<?xml version="1.0" ?>\n<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">\n<nvidia_smi_log>\n'
        f"\t<driver_version>{driver}</driver_version>\n\t<cuda_version>{cuda}</cuda_version>\n"
        f"\t<attached_gpus>{count}</attached_gpus>\n{gpus}</nvidia_smi_log>\n"
    )


def _table(gpu_id: str, count: int, memory_mib: int, driver: str, cuda: str) -> str:
    rows = "".join(f"| {index}  {gpu_id:<40} | 1MiB / {memory_mib}MiB |\n" for index in range(count))
    return f"| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda} |\n{rows}"

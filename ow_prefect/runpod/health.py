"""The GPU health check a RunPod pod runs before its flow starts, and the report the worker reads back.

In the pod, docker/entrypoint.sh runs it before the pod's command whenever the worker passed what it rented
(`OW_HEALTH_EXPECT`, JSON: GPU type, count, memory per GPU as RunPod advertises it, the CUDA floor, the free disk
needed):

    python -m ow_prefect.runpod.health

It checks that the pod sees what was rented: the GPUs (count, and memory within `VRAM_TOLERANCE` of the type's),
a driver whose CUDA version reaches the floor, and free container disk. It looks with `nvidia-smi -q -x` and,
where the image has a CUDA build of torch (the train image's Python; the serve image's vLLM environment at
`OW_VLLM_PYTHON`), runs a small matmul on every GPU: what catches a driver too old for the image's CUDA, or a GPU
the image has no kernels for. A pod with neither sees no GPU and fails. `OW_HEALTH_PROBES` limits the sources
(FakeRunPod's pods simulate nvidia-smi only: ow_prefect/testing/fake_gpus.py).

It prints what it saw, then one line `ow-health: {...}` (the `Report`, JSON), and exits 0, or `FAILED_EXIT_CODE`
when a check failed. The RunPod worker reads that line from the pod's log (`parse_report`), publishes it as the
`ow.pod.health` event, and on a failure deletes the pod and tries the run on another GPU type or data center
(ow_prefect/workers/placement.py).

It imports next to nothing (the standard library; ow_prefect's settings only to find the vLLM environment): it
runs before anything else in the pod, on every pod.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

# The pod's run context, set per pod (by the worker, and by FakeRunPod for its simulated GPUs), not settings:
EXPECT_ENV = "OW_HEALTH_EXPECT"
PROBES_ENV = "OW_HEALTH_PROBES"  # comma-separated sources to use; default every one (PROBES)
PROBES = ("nvidia-smi", "torch")
REPORT_PREFIX = "ow-health: "
FAILED_EXIT_CODE = 3
# A GPU may show less memory than RunPod's catalog says for its type: the driver reserves some (an NVIDIA L4 shows
# 22.5 of its 24 GB). Half the memory (a misconfigured host) is far outside it.
VRAM_TOLERANCE = 0.10
PROBE_TIMEOUT_SECONDS = 180
MAX_PROBLEMS = 10
MAX_TEXT = 300

# Runs in the image's torch (this interpreter, or the vLLM environment's): every GPU, a kernel on each.
TORCH_PROBE = """
import json
out = {"gpus": []}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["available"] = bool(torch.version.cuda) and torch.cuda.is_available()
    for i in range(torch.cuda.device_count() if out["available"] else 0):
        free, total = torch.cuda.mem_get_info(i)
        x = torch.ones(256, 256, device=f"cuda:{i}")
        ok = (x @ x).sum().item() == 256 ** 3
        out["gpus"].append({"name": torch.cuda.get_device_name(i), "memory_gb": total / 2**30, "kernel_ok": ok})
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Expectation:
    """What the worker rented, for the pod to check."""

    gpu_type: str = ""
    gpu_count: int = 1
    memory_gb: float = 0.0  # per GPU, as RunPod's catalog has it
    min_cuda: str | None = None  # the host CUDA floor the pod was created with
    min_free_disk_gb: float = 0.0

    def to_env(self) -> dict[str, str]:
        return {EXPECT_ENV: json.dumps(asdict(self), separators=(",", ":"))}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Expectation | None:
        raw = env.get(EXPECT_ENV)
        if not raw:
            return None
        values = json.loads(raw)
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if name in values})


@dataclass
class SeenGpu:
    name: str
    memory_gb: float
    kernel_ok: bool | None = None  # torch only: a matmul ran and gave the right answer


@dataclass
class Reading:
    """What one source (nvidia-smi, torch) saw; `error` when it ran but failed."""

    source: str
    gpus: list[SeenGpu] = field(default_factory=list)
    error: str | None = None
    driver: str | None = None  # nvidia-smi: driver version
    cuda: str | None = None  # nvidia-smi: highest CUDA the driver supports; torch: CUDA it was built for
    version: str | None = None  # torch's own version


@dataclass
class Report:
    """The check's verdict, as the pod prints it and the worker reads it."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    gpu_type: str = ""
    gpu_count: int = 0
    gpus: list[str] = field(default_factory=list)  # "NVIDIA RTX A6000 (48.0 GB)", per GPU seen
    driver: str | None = None
    cuda: str | None = None
    torch: str | None = None  # "2.11.0 (CUDA 13.0)"
    disk_free_gb: float | None = None
    data_center: str | None = None
    pod: str | None = None
    sources: list[str] = field(default_factory=list)

    def line(self) -> str:
        return REPORT_PREFIX + json.dumps(asdict(self), separators=(",", ":"))

    def summary(self) -> str:
        """One line for people: what was seen, and what failed."""
        seen = ", ".join(self.gpus) or "no GPU"
        driver = f"driver {self.driver} (CUDA {self.cuda})" if self.driver else "no driver seen"
        verdict = "passed" if self.ok else "FAILED: " + "; ".join(self.problems)
        return f"GPU health check {verdict} — sees {seen}; {driver}" + (f"; torch {self.torch}" if self.torch else "")


def parse_report(lines: Iterable[str]) -> Report | None:
    """The last report in a pod's log lines; None when there is none (the check did not run, or not yet).

    The pod is not trusted: fields of the wrong type are dropped, texts are cut short."""
    for line in reversed(list(lines)):
        at = line.find(REPORT_PREFIX)
        if at < 0:
            continue
        try:
            values = json.loads(line[at + len(REPORT_PREFIX) :])
        except ValueError:
            continue
        if isinstance(values, dict) and isinstance(values.get("ok"), bool):
            return _report_from(values)
    return None


def _report_from(values: dict[str, Any]) -> Report:
    report = Report(ok=values["ok"])
    for name, default in asdict(Report(ok=False)).items():
        value = values.get(name, default)
        if name == "ok":
            continue
        if isinstance(default, list):
            value = [str(item)[:MAX_TEXT] for item in value][:MAX_PROBLEMS] if isinstance(value, list) else []
        elif name in ("gpu_count",):
            value = value if isinstance(value, int) else 0
        elif name == "disk_free_gb":
            value = float(value) if isinstance(value, int | float) else None
        else:
            value = str(value)[:MAX_TEXT] if value is not None else None
        setattr(report, name, value)
    return report


# ---- the sources ------------------------------------------------------------------------------------------


def read_nvidia_smi(executable: str = "nvidia-smi") -> Reading | None:
    """`nvidia-smi -q -x`: GPUs, memory, driver and its CUDA version; None when nvidia-smi is not installed."""
    path = shutil.which(executable)
    if path is None:
        return None
    try:
        done = subprocess.run([path, "-q", "-x"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return Reading("nvidia-smi", error=f"no answer within {PROBE_TIMEOUT_SECONDS} s")
    if done.returncode != 0:
        message = (done.stdout + done.stderr).strip().splitlines()
        return Reading("nvidia-smi", error=f"exit code {done.returncode}: {' '.join(message)[:MAX_TEXT]}")
    return parse_nvidia_smi(done.stdout)


def parse_nvidia_smi(xml_text: str) -> Reading:
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        return Reading("nvidia-smi", error=f"unreadable output ({exc})")
    gpus = [
        SeenGpu(gpu.findtext("product_name", "?").strip(), _mib(gpu.findtext("fb_memory_usage/total")) / 1024)
        for gpu in root.findall("gpu")
    ]
    return Reading(
        "nvidia-smi", gpus, driver=_text(root.findtext("driver_version")), cuda=_text(root.findtext("cuda_version"))
    )


def read_torch() -> Reading | None:
    """Run TORCH_PROBE in the image's torch; None when the image has none (or only a CPU build)."""
    interpreter = _torch_interpreter()
    if interpreter is None:
        return None
    try:
        done = subprocess.run(
            [interpreter, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        return Reading("torch", error=f"no answer within {PROBE_TIMEOUT_SECONDS} s")
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Reading("torch", error=f"the probe failed: {(done.stderr or done.stdout).strip()[-MAX_TEXT:]}")
    if not out.get("cuda") and not out.get("error"):
        return None  # a CPU build of torch says nothing about the GPU
    gpus = [SeenGpu(gpu["name"], gpu["memory_gb"], gpu["kernel_ok"]) for gpu in out.get("gpus", [])]
    reading = Reading("torch", gpus, error=out.get("error"), cuda=out.get("cuda"), version=out.get("torch"))
    if reading.error is None and not out.get("available"):
        reading.error = "torch.cuda.is_available() is False"
    return reading


def _torch_interpreter() -> str | None:
    """This Python when it has torch (the train image), else the vLLM environment's (the serve image)."""
    if find_spec("torch") is not None:
        return sys.executable
    from ow_prefect.settings import get_settings

    vllm_python = get_settings().vllm_interpreter
    return str(vllm_python) if vllm_python.exists() else None


def free_disk_gb(path: str | Path = ".") -> float:
    return shutil.disk_usage(path).free / 1e9


# ---- the verdict ------------------------------------------------------------------------------------------


def evaluate(
    expect: Expectation, smi: Reading | None, torch: Reading | None, disk_free: float | None, env: Mapping[str, str]
) -> Report:
    """Compare what the sources saw with what was rented."""
    problems: list[str] = []
    if smi is None and torch is None:
        problems.append("no GPU visible: nvidia-smi is not in the pod and the image has no CUDA build of torch")
    for reading in (smi, torch):
        if reading is not None:
            problems += _source_problems(expect, reading)
    if disk_free is not None and disk_free < expect.min_free_disk_gb:
        problems.append(
            f"only {disk_free:.1f} GB free on the container disk, {expect.min_free_disk_gb:g} GB needed "
            "(raise container_disk_gb)"
        )
    seen = next((r for r in (smi, torch) if r is not None and r.gpus), None)
    return Report(
        ok=not problems,
        problems=[problem[:MAX_TEXT] for problem in problems[:MAX_PROBLEMS]],
        gpu_type=expect.gpu_type,
        gpu_count=expect.gpu_count,
        gpus=[f"{gpu.name} ({gpu.memory_gb:.1f} GB)" for gpu in (seen.gpus if seen else [])],
        driver=smi.driver if smi else None,
        cuda=smi.cuda if smi else None,
        torch=f"{torch.version} (CUDA {torch.cuda})" if torch and torch.version else None,
        disk_free_gb=round(disk_free, 1) if disk_free is not None else None,
        data_center=env.get("RUNPOD_DC_ID"),
        pod=env.get("RUNPOD_POD_ID"),
        sources=[reading.source for reading in (smi, torch) if reading is not None],
    )


def _source_problems(expect: Expectation, reading: Reading) -> list[str]:
    source = reading.source
    if reading.error:
        return [f"{source}: {reading.error}"]
    problems = []
    if len(reading.gpus) < expect.gpu_count:
        problems.append(f"{source} sees {len(reading.gpus)} GPU(s), {expect.gpu_count} rented")
    floor = expect.memory_gb * (1 - VRAM_TOLERANCE)
    for index, gpu in enumerate(reading.gpus):
        if gpu.memory_gb < floor:
            problems.append(
                f"{source}: GPU {index} ({gpu.name}) has {gpu.memory_gb:.1f} GB, {expect.gpu_type or 'the type'} "
                f"has {expect.memory_gb:g} GB"
            )
        if gpu.kernel_ok is False:
            problems.append(f"{source}: a CUDA kernel gave a wrong result on GPU {index} ({gpu.name})")
    host, needed = _version(reading.cuda), _version(expect.min_cuda)
    if source == "nvidia-smi" and host and needed and host < needed:
        problems.append(
            f"the host driver {reading.driver} supports CUDA {reading.cuda}, the image needs CUDA {expect.min_cuda}"
        )
    return problems


def check(env: Mapping[str, str] | None = None) -> Report:
    """Look with every source `OW_HEALTH_PROBES` allows and judge against `OW_HEALTH_EXPECT`."""
    env = os.environ if env is None else env
    expect = Expectation.from_env(env) or Expectation()
    probes = [name.strip() for name in env.get(PROBES_ENV, ",".join(PROBES)).split(",")]
    smi = read_nvidia_smi() if "nvidia-smi" in probes else None
    torch = read_torch() if "torch" in probes else None
    return evaluate(expect, smi, torch, free_disk_gb(), env)


def main() -> int:
    report = check()
    print(report.summary(), flush=True)
    print(report.line(), flush=True)
    return 0 if report.ok else FAILED_EXIT_CODE


def _mib(text: str | None) -> float:
    """'23034 MiB' -> 23034.0; anything unreadable -> 0."""
    try:
        return float((text or "").split()[0])
    except (IndexError, ValueError):
        return 0.0


def _text(value: str | None) -> str | None:
    return value.strip() if value and value.strip() else None


def _version(text: str | None) -> tuple[int, ...] | None:
    """'12.8' -> (12, 8); None when there is no readable version ('N/A')."""
    try:
        return tuple(int(part) for part in (text or "").split("."))
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())

"""The pod's GPU health check (ow_prefect/runpod/health.py): what nvidia-smi's real output says, each verdict, the
report the worker reads back (from a pod it does not trust), and docker/entrypoint.sh running it before the command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ow_prefect.runpod.health import (
    EXPECT_ENV,
    FAILED_EXIT_CODE,
    REPORT_PREFIX,
    Expectation,
    Reading,
    SeenGpu,
    evaluate,
    parse_nvidia_smi,
    parse_report,
)
from ow_prefect.testing.fake_gpus import FakeGpus
from tests.conftest import ROOT

SAMPLES = ROOT / "tests" / "data" / "nvidia-smi"
A6000 = Expectation(gpu_type="NVIDIA RTX A6000", gpu_count=1, memory_gb=48, min_cuda="12.8", min_free_disk_gb=10)


def smi(*memory_gb: float, driver: str = "570.124.06", cuda: str = "12.8", error: str | None = None) -> Reading:
    return Reading("nvidia-smi", [SeenGpu("NVIDIA RTX A6000", gb) for gb in memory_gb], error, driver, cuda)


def test_reads_nvidia_smi_xml_as_the_driver_writes_it():
    """Two L4s in nvidia-smi 555's own layout: the frame buffer's total, not BAR1's 32 GB; 23034 MiB is 22.5 GB."""
    reading = parse_nvidia_smi((SAMPLES / "l4-x2-driver-555.xml").read_text())
    assert reading.error is None
    assert [(gpu.name, round(gpu.memory_gb, 2)) for gpu in reading.gpus] == [("NVIDIA L4", 22.49)] * 2
    assert (reading.driver, reading.cuda) == ("555.42.06", "12.5")


def test_a_real_l4_passes_against_the_catalogs_24_gb():
    """The driver keeps 6% of an L4 for itself: inside the tolerance, so a healthy L4 is not sent away."""
    reading = parse_nvidia_smi((SAMPLES / "l4-x2-driver-555.xml").read_text())
    expect = Expectation(gpu_type="NVIDIA L4", gpu_count=2, memory_gb=24, min_cuda="12.4")
    report = evaluate(expect, reading, None, 40.0, {"RUNPOD_DC_ID": "US-TX-3", "RUNPOD_POD_ID": "abc"})
    assert report.ok, report.problems
    assert report.gpus == ["NVIDIA L4 (22.5 GB)"] * 2
    assert (report.driver, report.cuda, report.data_center, report.pod) == ("555.42.06", "12.5", "US-TX-3", "abc")


@pytest.mark.parametrize(
    ("smi_reading", "torch_reading", "disk", "problem"),
    [
        (smi(error="exit code 6: No devices were found"), None, 40, "nvidia-smi: exit code 6: No devices were found"),
        (smi(24.0), None, 40, "GPU 0 (NVIDIA RTX A6000) has 24.0 GB, NVIDIA RTX A6000 has 48 GB"),
        (smi(47.6, driver="535.183.01", cuda="12.2"), None, 40, "driver 535.183.01 supports CUDA 12.2, the image"),
        (smi(), None, 40, "nvidia-smi sees 0 GPU(s), 1 rented"),
        (smi(47.6), None, 3.5, "only 3.5 GB free on the container disk, 10 GB needed"),
        (None, None, 40, "no GPU visible: nvidia-smi is not in the pod and the image has no CUDA build of torch"),
        (
            smi(47.6),
            Reading("torch", error="torch.cuda.is_available() is False", cuda="13.0", version="2.11.0"),
            40,
            "torch: torch.cuda.is_available() is False",
        ),
        (
            None,
            Reading("torch", [SeenGpu("NVIDIA RTX A6000", 47.6, kernel_ok=False)], cuda="13.0", version="2.11.0"),
            40,
            "a CUDA kernel gave a wrong result on GPU 0",
        ),
    ],
    ids=["no-gpu", "half-vram", "old-driver", "no-device-listed", "disk", "no-tool", "torch-no-cuda", "bad-kernel"],
)
def test_each_failure_is_named(smi_reading, torch_reading, disk, problem):
    report = evaluate(A6000, smi_reading, torch_reading, disk, {})
    assert not report.ok
    assert any(problem in line for line in report.problems), report.problems


def test_a_healthy_pod_passes_with_both_sources():
    torch_reading = Reading("torch", [SeenGpu("NVIDIA RTX A6000", 47.4, kernel_ok=True)], cuda="13.0", version="2.11.0")
    report = evaluate(A6000, smi(47.6), torch_reading, 40, {})
    assert report.ok and report.problems == []
    assert report.torch == "2.11.0 (CUDA 13.0)" and report.sources == ["nvidia-smi", "torch"]


def test_the_report_survives_the_log_and_a_lying_pod_cannot_break_the_reader():
    report = evaluate(A6000, smi(24.0), None, 40, {"RUNPOD_DC_ID": "EU-RO-1"})
    lines = ["booting", report.summary(), "2026-11-30T10:00:00Z " + report.line(), "after"]
    assert parse_report(lines) == report
    assert parse_report(["nothing here", REPORT_PREFIX + "{not json"]) is None
    hostile = REPORT_PREFIX + json.dumps({"ok": False, "problems": ["x" * 5000] * 50, "gpu_count": "many", "pod": 7})
    read = parse_report([hostile])
    assert len(read.problems) == 10 and all(len(p) == 300 for p in read.problems)
    assert read.gpu_count == 0 and read.pod == "7"
    assert parse_report([REPORT_PREFIX + json.dumps({"ok": "yes"})]) is None


def test_the_expectation_travels_in_one_variable():
    env = A6000.to_env()
    assert list(env) == [EXPECT_ENV]
    assert Expectation.from_env(env) == A6000
    assert Expectation.from_env({}) is None


# ---- docker/entrypoint.sh runs the check before the command --------------------------------------------------


def entrypoint(tmp_path: Path, fake_gpu_fault: str | None, *command: str) -> subprocess.CompletedProcess:
    """docker/entrypoint.sh with a simulated nvidia-smi (as FakeRunPod's pods have) and this Python first on PATH."""
    gpus = FakeGpus({"NVIDIA RTX A6000": 48}, host_cuda="12.8")
    if fake_gpu_fault:
        gpus.break_type("NVIDIA RTX A6000", fake_gpu_fault)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HF_HOME": str(tmp_path / "hf"),
        "HOME": str(tmp_path),
        "RUNPOD_DC_ID": "US-TX-3",
        **A6000.to_env(),
    }
    env = gpus.pod_env(tmp_path, {"id": "NVIDIA RTX A6000", "count": 1}, "US-TX-3", env)
    script = ROOT / "docker" / "entrypoint.sh"
    return subprocess.run(
        ["bash", str(script), *command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_entrypoint_checks_the_gpu_then_runs_the_command(tmp_path):
    done = entrypoint(tmp_path, None, "echo", "the flow starts")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "the flow starts"
    report = parse_report(lines)
    assert report.ok and report.gpus == ["NVIDIA RTX A6000 (47.6 GB)"] and report.cuda == "12.8"
    assert report.sources == ["nvidia-smi"]  # the simulated GPU alone: torch here is a CPU build


@pytest.mark.parametrize("fault", ["no_gpu", "half_vram", "old_driver"])
def test_entrypoint_stops_a_pod_whose_gpu_fails_before_the_command(tmp_path, fault):
    done = entrypoint(tmp_path, fault, "echo", "the flow starts")
    assert done.returncode == FAILED_EXIT_CODE
    assert "the flow starts" not in done.stdout
    report = parse_report(done.stdout.splitlines())
    assert not report.ok and report.data_center == "US-TX-3"
    assert "GPU health check FAILED" in done.stdout

"""FakeRunPod's GPUs (ow_prefect/testing/fake_gpus.py): its pods run docker/entrypoint.sh as the images do, and the
health check in it reads the simulated nvidia-smi — healthy, or broken per GPU type and data center."""

import httpx
import pytest

from ow_prefect.runpod.health import Expectation, parse_report
from ow_prefect.testing.fake_runpod import FakeRunPod
from tests.conftest import ROOT
from tests.helpers import eventually

A6000 = "NVIDIA RTX A6000"
EXPECT = Expectation(gpu_type=A6000, gpu_count=1, memory_gb=48, min_cuda="12.8")


@pytest.fixture(scope="module")
def fake():
    entrypoint = str(ROOT / "docker" / "entrypoint.sh")
    with FakeRunPod(api_key="k", boot_seconds=0.1, restart_backoff=0.5, kill_grace=2, entrypoint=entrypoint) as fake:
        yield fake


def start_pod(fake: FakeRunPod, data_center: str = "US-TX-3") -> str:
    body = {
        "name": "gpu-check",
        "image": "ow-prefect-train:test",
        "gpu": {"id": A6000, "count": 1},
        "dataCenterIds": [data_center],
        "env": EXPECT.to_env(),
        "args": "echo command started; exec sleep 60",
    }
    fake.set_stock(A6000, 2, data_center=data_center)
    with httpx.Client(base_url=fake.url, headers={"Authorization": "Bearer k"}) as api:
        response = api.post("/pods", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]


def container_lines(fake: FakeRunPod, pod_id: str, until: str) -> list[str]:
    lines = eventually(
        lambda: any(until in line.line for line in fake.pods[pod_id].logs) and fake.pods[pod_id].logs, timeout=30
    )
    assert lines, [line.line for line in fake.pods[pod_id].logs]
    return [line.line for line in lines if line.source == "container"]


def test_a_healthy_type_passes_and_the_command_runs(fake):
    pod_id = start_pod(fake)
    lines = container_lines(fake, pod_id, "command started")
    report = parse_report(lines)
    assert report.ok and report.gpus == [f"{A6000} (47.6 GB)"] and report.driver == "570.124.06"
    assert report.pod == pod_id and report.data_center == "US-TX-3"


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("no_gpu", "nvidia-smi: exit code 6: No devices were found"),
        ("half_vram", "has 23.6 GB, NVIDIA RTX A6000 has 48 GB"),
        ("old_driver", "the host driver 535.183.01 supports CUDA 12.2, the image needs CUDA 12.8"),
    ],
)
def test_a_broken_type_fails_before_the_command_and_crash_loops(fake, fault, problem):
    fake.gpus.break_type(A6000, fault, data_center="EU-RO-1")
    try:
        healthy = start_pod(fake, "US-TX-3")
        broken = start_pod(fake, "EU-RO-1")
        lines = container_lines(fake, broken, "container exited with code 3")
        report = parse_report(lines)
        assert not report.ok and any(problem in p for p in report.problems), report.problems
        assert "command started" not in lines
        assert parse_report(container_lines(fake, healthy, "command started")).ok  # only EU-RO-1's hosts are bad
    finally:
        fake.gpus.clear()

"""The dev pod command against FakeRunPod: it prints how to connect and always deletes its pod."""

import os
import signal
import subprocess
import sys

import pytest

from ow_prefect.testing.fake_runpod import FakeRunPod


@pytest.fixture
def fake():
    with FakeRunPod(api_key="dev-key", boot_seconds=0.3) as f:
        yield f


def start(fake, *args):
    env = {**os.environ, "RUNPOD_API_KEY": "dev-key", "RUNPOD_API_URL": fake.url}
    return subprocess.Popen(
        [sys.executable, "-m", "ow_prefect.runpod.devpod", "--image", "ghcr.io/me/dev:1", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_dev_pod_prints_ssh_and_is_deleted_after_its_hours(fake):
    proc = start(fake, "--hours", "0.001", "--min-vram-gb", "40", "--port", "8888/http")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    (pod,) = fake.pods.values()
    assert pod.name.startswith("ow-dev-") and pod.deleted_at is not None
    assert pod.gpu["id"] == "NVIDIA RTX A6000" and pod.args == ""  # the image's own command, no flow run
    assert sorted(pod.ports) == ["22/tcp", "8888/http"]
    assert f"ssh root@127.0.0.1 -p {pod.port_map['22/tcp']}" in out
    assert f"https://{pod.id}-8888.proxy.runpod.net" in out
    assert "deleted after" in out and "dev-key" not in out


def test_dev_pod_is_deleted_on_ctrl_c(fake):
    proc = start(fake)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ssh:"):
            break
    else:
        pytest.fail("".join(lines))
    (pod,) = fake.pods.values()
    assert pod.deleted_at is None
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert pod.deleted_at is not None, "".join(lines) + rest
    assert "deleted after" in rest


def test_dev_pod_without_credentials_says_how_to_give_them():
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "ow_prefect.runpod.devpod", "--image", "x"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1 and "RUNPOD_API_KEY" in result.stderr and "Traceback" not in result.stderr

"""FakeRunPod's pods as local processes: the pod record (`FakePod`) and its supervisor (`PodSupervisor`, a mixin
of `FakeRunPod`), which boots the container after `boot_seconds`, runs its `args` under `bash -c` with the image's
environment, restarts it after `restart_backoff` whenever it exits, pumps its output into the pod's log, and
kills its process group (SIGTERM, then SIGKILL after `kill_grace`) when the pod is stopped or deleted."""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ow_prefect.testing.fake_runpod.logs import LogLine, _now
from ow_prefect.testing.servers import free_port

VCPUS_PER_GPU = 8
# What a test machine's environment contributes to a fake pod, standing in for the image's ENV lines (the real
# images set PATH, OW_HOME, OW_VLLM_PYTHON, HF_HOME, VLLM_CACHE_ROOT, PYTHONPATH: docker/Dockerfile).
# OW_TRAIN_BACKEND too: a machine playing a GPU image without a GPU says so once (docs/runpod.md's fake recipe
# exports it), as an image would; OW_VLLM_OPTIMIZATION_LEVEL likewise (the test suite starts vLLM without
# compiling: flows/_vllm.py), and PREFECT_API_SSL_CERT_FILE (an image that trusts its own CA sets it; the test
# suite names a one-certificate file). VLLM_CACHE_ROOT, when set here, plays a network volume's vLLM cache that
# every pod shares.
IMAGE_VARIABLES = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "OW_HOME",
    "OW_VLLM_PYTHON",
    "HF_HOME",
    "VLLM_CACHE_ROOT",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OW_TRAIN_BACKEND",
    "OW_VLLM_OPTIMIZATION_LEVEL",
    "PREFECT_API_SSL_CERT_FILE",
)


def default_image_env() -> dict[str, str]:
    """The environment of this machine playing the image: its `IMAGE_VARIABLES`, with this interpreter's directory
    first on PATH (in the images, `python` and `prefect` are the ones that have ow_prefect)."""
    env = {name: os.environ[name] for name in IMAGE_VARIABLES if name in os.environ}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env


@dataclass
class FakePod:
    """The fake's record of one pod. Tests read it; the server changes it under the fake's lock."""

    id: str
    name: str
    image: str
    args: str
    disk: int
    ports: list[str]
    env: dict[str, str]
    registry: str | None
    mounts: dict[str, Any]
    global_networking: bool
    gpu: dict[str, Any] | None
    cpu: dict[str, Any] | None
    cloud: str
    data_center_id: str
    price: float  # USD per hour for the whole pod, billed while it is RUNNING
    stock_key: tuple[str, str, str] | None  # the stock its GPUs came from; None for a CPU pod
    api_key: str  # the pod-scoped RUNPOD_API_KEY; the fake does not accept it
    workdir: Path
    port_map: dict[str, int]  # "8000/http" -> public loopback port
    status: str = "RUNNING"
    locked: bool = False
    holds_stock: bool = True
    process: subprocess.Popen | None = None  # the latest container process, kept after it ends
    restarts: int = 0
    generation: int = 0  # bumped whenever the container is stopped or started, to retire old supervisors
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    up_since: datetime | None = None  # when the current container started; None while it is not up
    deleted_at: datetime | None = None
    stopped_at: datetime | None = None  # when it was last stopped (EXITED, not billed); None while it runs
    boot_stalled: bool = False  # its image pull never finishes: no container, no runtime, until deleted
    logs: list[LogLine] = field(default_factory=list)  # a list, so tests can read it while lines arrive
    next_log_seq: int = 1


class PodSupervisor:
    """Starting, watching and stopping a pod's container process (a mixin of `FakeRunPod`)."""

    def _start_container(self, pod: FakePod) -> None:
        pod.generation += 1
        supervisor = threading.Thread(
            target=self._supervise, args=(pod, pod.generation), name=f"fake-pod-{pod.id}", daemon=True
        )
        supervisor.start()

    def _stop_container(self, pod: FakePod) -> subprocess.Popen | None:
        """Retire the pod's supervisor and return its process, if running, for the caller to terminate."""
        pod.generation += 1
        pod.up_since = None
        return pod.process if _alive(pod.process) else None

    def _terminate(self, process: subprocess.Popen | None) -> None:
        if process:
            _terminate_process_groups([process], self.kill_grace)

    def _supervise(self, pod: FakePod, generation: int) -> None:
        """Boot the container and restart it whenever its command exits, until the pod's container is stopped."""
        if pod.boot_stalled:
            with self._lock:
                self._log(pod, "system", f"pulling image {pod.image or '(the default image)'}")
            while not self._closed and pod.generation == generation:
                time.sleep(0.2)
            return
        delay = self.boot_seconds
        while True:
            time.sleep(delay)
            with self._lock:
                if self._closed or pod.generation != generation:
                    return
                process, readers = self._launch(pod)
            if process is None:
                return
            exit_code = process.wait()
            _signal_group(process, signal.SIGKILL)  # a container's leftovers die with it
            for reader in readers:
                reader.join(timeout=1)
            with self._lock:
                if self._closed or pod.generation != generation:
                    return
                pod.up_since = None
                pod.restarts += 1
                self._log(pod, "system", f"container exited with code {exit_code}; restarting")
            delay = self.restart_backoff

    def _launch(self, pod: FakePod) -> tuple[subprocess.Popen | None, list[threading.Thread]]:
        pod.up_since = pod.started_at = _now()
        if not pod.args.strip() and not self.entrypoint:
            self._log(pod, "system", "container started with the image's default command (the fake runs nothing)")
            return None, []
        command = f"exec {shlex.quote(self.entrypoint)} {pod.args}" if self.entrypoint else pod.args
        pod.process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=pod.workdir,
            env=self._container_env(pod),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._log(pod, "system", f"container started: {pod.args}")
        readers = [
            threading.Thread(target=self._pump_output, args=(pod, stream), daemon=True)
            for stream in (pod.process.stdout, pod.process.stderr)
        ]
        for reader in readers:
            reader.start()
        return pod.process, readers

    def _container_env(self, pod: FakePod) -> dict[str, str]:
        gpu_count = pod.gpu["count"] if pod.gpu else 0
        injected = {
            "RUNPOD_POD_ID": pod.id,
            "RUNPOD_DC_ID": pod.data_center_id,
            "RUNPOD_POD_HOSTNAME": f"{pod.id}-fake",
            "RUNPOD_GPU_COUNT": str(gpu_count),
            "RUNPOD_CPU_COUNT": str(pod.cpu["vcpuCount"] if pod.cpu else VCPUS_PER_GPU * gpu_count),
            "RUNPOD_API_KEY": pod.api_key,
            "RUNPOD_PUBLIC_IP": "127.0.0.1",
        }
        injected |= {f"RUNPOD_TCP_PORT_{_private_port(spec)}": str(public) for spec, public in pod.port_map.items()}
        env = {**self.image_env, "HOME": str(pod.workdir), **pod.env}
        if pod.mounts.get("network"):
            injected["RUNPOD_VOLUME_ID"] = pod.mounts["network"][0]["volumeId"]
            env = self._volume_env(pod.mounts, env)
        env = {**env, **injected}
        return self.gpus.pod_env(pod.workdir, pod.gpu, pod.data_center_id, env)  # its simulated nvidia-smi

    def _pump_output(self, pod: FakePod, stream: Any) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                with self._lock:
                    self._log(pod, "container", raw.decode(errors="replace").rstrip("\r\n"))


def _map_ports(ports: list[str], current: dict[str, int]) -> dict[str, int]:
    """Give each exposed port a free loopback port, keeping the ones already mapped."""
    return {spec: current.get(spec) or free_port() for spec in ports}


def _private_port(port_spec: str) -> int:
    return int(port_spec.split("/")[0])


def _alive(process: subprocess.Popen | None) -> bool:
    return process is not None and process.poll() is None


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _terminate_process_groups(processes: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM each process group, then SIGKILL each group once its leader exits or `grace` seconds pass."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
        _signal_group(process, signal.SIGKILL)
        process.wait()

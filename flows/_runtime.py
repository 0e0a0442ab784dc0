"""What every built-in flow does around its work: identify the job, check its code, run the main work
once, stream subprocess output into the run's logs and record the job's outputs.
"""

from __future__ import annotations

import inspect
import os
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from prefect import get_run_logger, task
from prefect.context import FlowRunContext
from prefect.utilities.annotations import opaque
from pydantic import BaseModel, Field

from ow_prefect.errors import CodeMismatchError
from ow_prefect.jobs import Job
from ow_prefect.jobs.submit import JOB_TAG, job_tag, outputs_key, type_tag
from ow_prefect.settings import get_settings
from ow_prefect.storage import Storage

RESULT_PURPOSE = "result"  # files a job produces for the user (outputs, completions, logs)


@dataclass
class JobRun:
    job_cls: type[Job]
    id: str
    parameters: dict[str, Any]
    storage: Storage
    flow_run: Any


def start_job(job_cls: type[Job], parameters: dict[str, Any], ow_job: dict[str, Any] | None) -> JobRun:
    """Validate the parameters, check that this code is the code the client hashed, tag the run."""
    validated = job_cls.validate_params(**parameters)
    flow_parameters = job_cls.flow_parameters(validated)
    image = (ow_job or {}).get("image") or job_cls.image()
    computed = job_cls.compute_id(flow_parameters, image=image)
    if ow_job and ow_job.get("id") != computed:
        raise CodeMismatchError(
            f"job {ow_job.get('id')} was submitted with code hash {ow_job.get('code_hash')}, but the flow running "
            f"it has code hash {job_cls.code_hash()} (job id {computed}): the image or the client is out of date. "
            "Rebuild the image, or update the client to the same ow_prefect version."
        )
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    if flow_run is not None:
        _ensure_tags(flow_run, [JOB_TAG, job_tag(computed), type_tag(job_cls.name)])
    get_run_logger().info("job %s (%s)", computed, job_cls.name)
    return JobRun(job_cls, computed, flow_parameters, Storage.from_settings(), flow_run)


def hf_token_secret() -> str:
    """Name of the Secret block holding the team's Hugging Face token (`OW_HF_TOKEN_SECRET`, default 'hf-token')."""
    return os.environ.get("OW_HF_TOKEN_SECRET", "hf-token")


def hf_token() -> str | None:
    """The token in the Secret block `hf_token_secret()`, or None when there is none."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(hf_token_secret(), _sync=True).get()
    except ValueError:
        return None


def provide_hf_token(job: JobRun) -> None:
    """Let this run download gated models (Llama, Gemma, ...): the HF token Secret block becomes `HF_TOKEN` in
    the run's process, where huggingface_hub, transformers, datasets and the vLLM processes the flow starts
    find it. Only in a worker's process (a pod, a process pool), which runs this one flow run: a flow called in
    your own process (embedded) uses your own Hugging Face login. A `HF_TOKEN` already set wins. The token is
    never a parameter or a log line, and custom jobs' commands do not get it unless they ask (flows/custom.py).
    """
    if os.environ.get("HF_TOKEN") or job.flow_run is None or job.flow_run.deployment_id is None:
        return
    token = hf_token()
    if token:
        os.environ["HF_TOKEN"] = token


def with_params_signature(fn: Callable[..., Any], params: type[BaseModel]) -> Callable[..., Any]:
    """Give ``fn(**kwargs)`` a signature with one keyword per field of `params` (plus ``ow_job``).

    Flow parameters stay flat — the UI form, ``prefect deployment run --param loss=dpo`` and per-deployment
    presets all work on single fields — while the fields, defaults and descriptions are written once, in the
    job type's pydantic model. Cross-field rules are checked by `start_job`.
    """
    parameters = []
    for name, field in params.model_fields.items():
        default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
        annotation = Annotated[field.annotation, Field(description=field.description)]
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    parameters.append(
        inspect.Parameter("ow_job", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=dict[str, Any] | None)
    )
    fn.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])
    # Prefect reads parameter descriptions (the UI form's help text) from a Google-style docstring.
    described = "\n".join(f"    {name}: {field.description}" for name, field in params.model_fields.items())
    envelope = "    ow_job: set by the ow_prefect SDK: job id, code hash, image."
    fn.__doc__ = f"{fn.__doc__ or ''}\n\nArgs:\n{described}\n{envelope}\n"
    fn.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": dict[str, Any]}
    return fn


def _ensure_tags(flow_run: Any, tags: list[str]) -> None:
    """Runs started from the UI or CLI get the job tags too, so `ow.jobs` finds them."""
    missing = [t for t in tags if t not in flow_run.tags]
    if not missing:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*flow_run.tags, *missing])


def run_once(job: JobRun, work: Callable[[JobRun], dict[str, Any]]) -> dict[str, Any]:
    """Run the job's main work as a task.

    A flow called directly from Python (no deployment) caches that task under the job id, persisted in
    the storage, so a second identical call returns the stored outputs; deployment runs are deduplicated
    by the client instead and always do the work (a retry must really rerun).
    """
    direct = job.flow_run is None or job.flow_run.deployment_id is None
    options: dict[str, Any] = {"name": f"{job.job_cls.name}-work", "persist_result": direct}
    if direct:
        options.update(
            cache_key_fn=lambda *_: f"ow-results/{job.id}", result_storage=_result_storage(), result_serializer="json"
        )
    else:
        from prefect.cache_policies import NO_CACHE

        options["cache_policy"] = NO_CACHE
    outputs = task(work, **options)(opaque(job))
    record_outputs(job, outputs)
    return outputs


def _result_storage() -> Any:
    """The storage block itself, or a saved LocalFileSystem block over the local storage directory."""
    settings = get_settings()
    if settings.storage_block:
        return settings.storage_block
    from prefect.filesystems import LocalFileSystem

    block = LocalFileSystem(basepath=str(settings.local_storage_dir))
    block.save("ow-local-storage", overwrite=True, _sync=True)
    return "local-file-system/ow-local-storage"


def record_outputs(job: JobRun, outputs: dict[str, Any]) -> None:
    record = dict(outputs)
    if job.flow_run is not None:
        record["flow_run_id"] = str(job.flow_run.id)
        record["run_count"] = job.flow_run.run_count
    job.storage.put_json(outputs_key(job.id), record)


def stream_command(command: str, cwd: str, env: dict[str, str], *, inherit: bool = True, tail_lines: int = 20) -> int:
    """Run `command` in a shell, sending each line of its output to the run's logs as it comes. Its environment
    is this process's plus `env`, or with `inherit=False` only `env`."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env={**os.environ, **env} if inherit else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info(line)
    if proc.returncode:
        last = "\n".join(tail)
        raise RuntimeError(f"command exited with code {proc.returncode}; its last output:\n{last}")
    return proc.returncode

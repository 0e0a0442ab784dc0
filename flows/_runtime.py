"""What every built-in flow does around its work: identify the job, check its code, do the work once per job
whoever starts the run, stream subprocess output into the run's logs and record the job's outputs.

`run_job` is the one path: compute the job id, take the job's lock (a global concurrency limit of one slot on
the Prefect server, so it holds across hosts and pods), and if a run of this job already completed — its
outputs are in storage and its flow run is on this server — finish at once with those outputs instead of
working (`force_rerun` works anyway). Outputs are versioned per run: a rerun never replaces the earlier record.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.utilities.annotations import opaque
from pydantic import BaseModel, Field

from ow_prefect.errors import CodeMismatchError, NotFoundError
from ow_prefect.jobs import Job
from ow_prefect.jobs.submit import (
    ACTIVE_STATES,
    JOB_TAG,
    cached_tag,
    history_key,
    job_tag,
    lock_name,
    outputs_key,
    run_outputs_key,
    type_tag,
)
from ow_prefect.settings import get_settings
from ow_prefect.storage import Storage

RESULT_PURPOSE = "result"  # files a job produces for the user (outputs, completions, logs)
FORCE_RERUN_HELP = (
    "Run the job again even though a run with the same parameters and code already completed; the earlier "
    "run's outputs stay in the job's history. Off (the default): such a run finishes at once with the stored "
    "outputs and runs nothing."
)
LOCK_LEASE_SECONDS = 60  # a holder that dies frees the job's lock within this (the server's minimum)
LOCK_POLL_SECONDS = 5.0


def job_resource(job_id: str) -> dict[str, str]:
    """The resource of a job's events (`ow.train.*`, `ow.run.log`)."""
    return {"prefect.resource.id": f"ow.job.{job_id}", "prefect.resource.name": job_id}


def flow_run_related(flow_run_id: str | None) -> list[dict[str, str]]:
    """Events name the flow run they happened in, so `job.events()` and `ow.events.list` find them."""
    if not flow_run_id:
        return []
    return [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]


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
        _set_tags(flow_run, add=[JOB_TAG, job_tag(computed), type_tag(job_cls.name)])
    get_run_logger().info("job %s (%s)", computed, job_cls.name)
    return JobRun(job_cls, computed, flow_parameters, Storage.from_settings(), flow_run)


OW_JOB_TITLE = "ow_job (set by the ow_prefect SDK)"
OW_JOB_DESCRIPTION = "Job id, code hash and image, set by the ow_prefect SDK; leave it empty in the UI and the CLI."
# Prefect titles every parameter by its name; a "title" in the annotation's json_schema_extra wins (Prefect merges
# it into the field it builds), so the UI form labels the envelope as the SDK's.
OwJobEnvelope = Annotated[dict[str, Any] | None, Field(json_schema_extra={"title": OW_JOB_TITLE})]


def run_job(job_cls: type[Job], parameters: dict[str, Any], work: Callable[[JobRun], dict[str, Any]]) -> Any:
    """What every built-in flow does with its parameters (`ow_job` and `force_rerun` among them): identify the
    job; under its lock, return the stored outputs of a completed run of it, or do `work` and record them."""
    parameters = dict(parameters)
    ow_job = parameters.pop("ow_job", None)
    force_rerun = bool(parameters.pop("force_rerun", False))
    job = start_job(job_cls, parameters, ow_job)
    provide_hf_token(job)
    with job_lock(job):
        done = None if force_rerun else completed_run(job)
        if done is None:
            if force_rerun:
                get_run_logger().info("force_rerun: running job %s even if a run of it completed", job.id)
            return run_once(job, work)
    record, original = done
    return finished_without_work(
        job,
        record,
        f"job {job.id} already completed in flow run '{original.name}' ({original.id}): returned its stored "
        "outputs and ran nothing (set force_rerun to run it again)",
    )


def completed_run(job: JobRun) -> tuple[dict[str, Any], Any] | None:
    """The stored outputs of this job and the flow run that made them, when that run is another one on this
    Prefect server. Outputs whose run this server does not know (another server, a reset database) are no
    cache: like the SDK, which looks jobs up in Prefect, the run does the work again (a new version)."""
    from prefect.exceptions import ObjectNotFound

    try:
        record = job.storage.get_json(outputs_key(job.id))
    except NotFoundError:
        return None
    run_id = record.get("flow_run_id")
    if not run_id or (job.flow_run is not None and run_id == str(job.flow_run.id)):
        return None
    with _prefect() as client:
        try:
            return record, client.read_flow_run(run_id)
        except (ObjectNotFound, ValueError):
            get_run_logger().info(
                "stored outputs of %s come from flow run %s, unknown here: running it", job.id, run_id
            )
            return None


def finished_without_work(job: JobRun, outputs: dict[str, Any], message: str) -> Any:
    """End the run Completed with `outputs` and `message`. It stops being a run of the job (tag `ow-cached:<id>`
    instead of `ow-job:<id>`), so the job stays the run that did the work."""
    from prefect.states import Completed

    if job.flow_run is not None:
        _set_tags(job.flow_run, add=[cached_tag(job.id)], remove=[JOB_TAG, job_tag(job.id)])
    get_run_logger().info(message)
    return Completed(message=message, data=outputs)


def hf_token_secret() -> str:
    """Name of the Secret block holding the team's Hugging Face token (`OW_HF_TOKEN_SECRET`, default 'hf-token')."""
    return get_settings().hf_token_secret


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


def with_params_signature(
    fn: Callable[..., Any], params: type[BaseModel], rerunnable: bool = True
) -> Callable[..., Any]:
    """Give ``fn(**kwargs)`` a signature with one keyword per field of `params` (plus ``force_rerun`` when the
    job can complete, and ``ow_job``).

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
    described = [f"    {name}: {field.description}" for name, field in params.model_fields.items()]
    if rerunnable:
        parameters.append(
            inspect.Parameter("force_rerun", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
        )
        described.append(f"    force_rerun: {FORCE_RERUN_HELP}")
    parameters.append(
        inspect.Parameter("ow_job", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=OwJobEnvelope)
    )
    described.append(f"    ow_job: {OW_JOB_DESCRIPTION}")
    fn.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])
    # Prefect reads parameter descriptions (the UI form's help text) from a Google-style docstring.
    fn.__doc__ = f"{fn.__doc__ or ''}\n\nArgs:\n" + "\n".join(described) + "\n"
    fn.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": dict[str, Any]}
    return fn


@contextmanager
def _prefect() -> Iterator[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


def _set_tags(flow_run: Any, add: list[str], remove: list[str] = ()) -> None:
    """Runs started from the UI or CLI get the job tags too, so `ow.jobs` finds them."""
    tags = [t for t in flow_run.tags if t not in remove]
    tags += [t for t in add if t not in tags]
    if tags == list(flow_run.tags):
        return
    with _prefect() as client:
        client.update_flow_run(flow_run.id, tags=tags)
    flow_run.tags = tags


# ---- the job's lock ---------------------------------------------------------------------------------------


@contextmanager
def job_lock(job: JobRun, wait: bool = True) -> Iterator[bool]:
    """Hold the job's lock: a global concurrency limit named after the job id, one slot, leased for
    `LOCK_LEASE_SECONDS` and renewed while held. Yields True once held; with ``wait=False`` yields False at once
    when another run holds it. The limit is deleted on release, so none accumulate.

    Waiting polls every `LOCK_POLL_SECONDS`. A slot that no active run of the job holds (its holder died and the
    server lost the lease, e.g. in a restart) is cleared after two polls, so a job can never stay locked (the
    holder tags itself as a run of the job before it takes the lock)."""
    name = lock_name(job.id)
    stack = _acquire(job, name, wait)
    if stack is None:
        yield False
        return
    try:
        yield True
    finally:
        stack.close()
        _delete_limit(name)


def _acquire(job: JobRun, name: str, wait: bool) -> ExitStack | None:
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    holder = ConcurrencyLeaseHolder(type="flow_run", id=job.flow_run.id) if job.flow_run is not None else None
    logger = get_run_logger()
    unheld_polls = missing = 0
    waiting_on = None
    while True:
        stack = ExitStack()
        try:
            stack.enter_context(
                concurrency(
                    name,
                    max_retries=0,
                    lease_duration=LOCK_LEASE_SECONDS,
                    strict=True,
                    holder=holder,
                    raise_on_lease_renewal_failure=False,
                )
            )
            return stack
        except ConcurrencySlotAcquisitionError as exc:
            if getattr(getattr(exc.__cause__, "response", None), "status_code", None) != 423:
                missing += 1  # no limit yet (or its holder just deleted it): create it
                if missing > 5:
                    raise
                _create_limit(name)
                continue
        others = other_active_runs(job)
        if others:
            if not wait:
                return None
            unheld_polls = 0
            if waiting_on != others[0].id:
                waiting_on = others[0].id
                logger.info(
                    "flow run '%s' (%s) is running job %s: waiting for it, then using its outputs",
                    others[0].name,
                    others[0].id,
                    job.id,
                )
        else:
            unheld_polls += 1
            if unheld_polls >= 2:
                logger.warning("the lock of job %s is held by no active run: clearing it", job.id)
                _delete_limit(name)
                unheld_polls = 0
        time.sleep(LOCK_POLL_SECONDS)


def other_active_runs(job: JobRun) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )

    own = job.flow_run.id if job.flow_run is not None else None
    flow_filter = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[job_tag(job.id)]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE_STATES))),
    )
    with _prefect() as client:
        return [run for run in client.read_flow_runs(flow_run_filter=flow_filter, limit=10) if run.id != own]


def _create_limit(name: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with _prefect() as client, suppress(ObjectAlreadyExists):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _delete_limit(name: str) -> None:
    from prefect.exceptions import ObjectNotFound

    with _prefect() as client, suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(name)


# ---- doing the work ---------------------------------------------------------------------------------------


def run_once(job: JobRun, work: Callable[[JobRun], dict[str, Any]]) -> dict[str, Any]:
    """Run the job's main work as a task (never cached: `run_job` decides whether work is needed) and record
    its outputs; returns the record (what a later run of the job returns without working)."""
    outputs = task(work, name=f"{job.job_cls.name}-work", cache_policy=NO_CACHE, persist_result=False)(opaque(job))
    return record_outputs(job, outputs)


def record_outputs(job: JobRun, outputs: dict[str, Any]) -> dict[str, Any]:
    """Store this run's outputs as a new version: its own record (never overwritten), the job's history, and the
    job's latest record (what `job.outputs` shows)."""
    record = dict(outputs)
    flow_run_id = str(job.flow_run.id) if job.flow_run is not None else "local"
    run_count = job.flow_run.run_count if job.flow_run is not None else 1
    record.update(flow_run_id=flow_run_id, run_count=run_count, completed_at=datetime.now(UTC).isoformat())
    history = _history(job)
    key = run_outputs_key(job.id, flow_run_id, run_count)
    job.storage.put_json(key, record)
    history.append(
        {"flow_run_id": flow_run_id, "run_count": run_count, "completed_at": record["completed_at"], "key": key}
    )
    job.storage.put_json(history_key(job.id), history)
    job.storage.put_json(outputs_key(job.id), record)
    return record


def _history(job: JobRun) -> list[dict[str, Any]]:
    """The job's history so far; a record from before histories existed becomes its first entry."""
    try:
        return job.storage.get_json(history_key(job.id))
    except NotFoundError:
        pass
    try:
        previous = job.storage.get_json(outputs_key(job.id))
    except NotFoundError:
        return []
    run_id, count = previous.get("flow_run_id", "unknown"), previous.get("run_count", 1)
    key = run_outputs_key(job.id, run_id, count)
    job.storage.put_json(key, previous)
    return [{"flow_run_id": run_id, "run_count": count, "completed_at": previous.get("completed_at"), "key": key}]


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

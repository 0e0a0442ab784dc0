"""`eval` (deployment `eval/inspect-ai`): an inspect-ai task against a model this run serves with vLLM.

The flow downloads the mounted task files (and the LoRA adapter, if any), starts vLLM's OpenAI server on a
loopback port with a key made for this run, runs `inspect eval <eval_name>` against it (inspect's
`openai-api` provider, the key and URL in its environment) with the user's options, and stores inspect's logs
as result files (`job.download(dir)` brings them home; `inspect view` opens them). The headline scores go to
`job.outputs` and to a table artifact.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._runtime import (
    RESULT_PURPOSE,
    JobRun,
    provide_hf_token,
    run_once,
    start_job,
    stream_command,
    with_params_signature,
)
from flows._vllm import ServerSpec, serving
from ow_prefect.jobs.api import adapter_name
from ow_prefect.jobs.evals import InspectJob, InspectParams, inspect_cli_options, slug

PROVIDER = "served"  # inspect's openai-api/<service>/<model>: reads SERVED_API_KEY and SERVED_BASE_URL


def served_base_name(base_model: str) -> str:
    """A local directory is served under its last component; a Hub id as it is."""
    return Path(base_model).name if os.path.isdir(base_model) else base_model


def read_scores(log_paths: list[Path]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """({task: {metric name: value}}, errors) from inspect's logs. A metric is named `scorer/metric`, or just
    `metric` when the task has one scorer."""
    from inspect_ai.log import read_eval_log

    scores: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    for path in log_paths:
        log = read_eval_log(str(path))
        task = log.eval.task
        if log.status != "success":
            message = log.error.message if log.error else log.status
            errors.append(f"{task}: {message}")
            continue
        results = log.results.scores if log.results else []
        single = len(results) == 1
        scores[task] = {
            (name if single else f"{score.name}/{name}"): metric.value
            for score in results
            for name, metric in score.metrics.items()
        }
    return scores, errors


def _evaluate(job: JobRun) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = InspectParams(**job.parameters)
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        work, logs = Path(tmp) / "work", Path(tmp) / "logs"
        work.mkdir()
        for target, file_id in cfg.mounts.items():
            job.storage.download(file_id, work / target)
        adapters = {}
        if cfg.adapter:
            name = adapter_name(cfg.model)
            adapters[name] = job.storage.download(cfg.adapter, Path(tmp) / "adapters" / name)
        spec = ServerSpec(
            base_model=cfg.base_model,
            served_name=served_base_name(cfg.base_model),
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            adapters=adapters,
            quantization=cfg.quantization,
        )
        target = next(iter(adapters), spec.served_name)
        command = [
            sys.executable,
            "-m",
            "inspect_ai",
            "eval",
            cfg.eval_name,
            "--model",
            f"openai-api/{PROVIDER}/{target}",
            "--log-dir",
            str(logs),
            "--display",
            "plain",
            *(["--max-connections", str(cfg.max_num_seqs)] if "max_connections" not in cfg.options else []),
            *inspect_cli_options(cfg.options),
        ]
        with serving(spec) as (base_url, key):
            logger.info("inspect eval %s against %s", cfg.eval_name, target)
            env = {f"{PROVIDER.upper()}_API_KEY": key, f"{PROVIDER.upper()}_BASE_URL": base_url}
            stream_command(shlex.join(command), cwd=str(work), env=env)
        log_paths = sorted(logs.glob("*.eval"))  # inspect's default log format (the flow never changes it)
        files = {f"logs/{path.name}": job.storage.put_path(path, RESULT_PURPOSE).id for path in log_paths}
        scores, errors = read_scores(log_paths)
    if errors:
        stored = ", ".join(files.values()) or "none"
        raise RuntimeError("inspect eval did not succeed: " + "; ".join(errors) + f" (its logs: {stored})")
    if not scores:
        raise RuntimeError(f"inspect eval wrote no log for {cfg.eval_name!r}: is it a task file or registry name?")
    rows = [
        {"task": task, "metric": name, "value": value}
        for task, metrics in scores.items()
        for name, value in metrics.items()
    ]
    key = cfg.artifact_key or f"inspect-{slug(cfg.eval_name, 30)}-{slug(cfg.model_label, 40)}"
    create_table_artifact(
        key=key, table=rows, description=f"inspect-ai {cfg.eval_name} on {cfg.model_label} ({job.id})", _sync=True
    )
    first = next(iter(scores.values()))
    headline = next(iter(first.values()), None)
    logger.info("scores: %s", scores)
    return {"score": headline, "scores": scores, "files": files, "model": cfg.model_label}


def inspect_eval(**params: Any) -> dict[str, Any]:
    """Run an inspect-ai task against a model (base, LoRA adapter or fine-tuning job) served with vLLM."""
    ow_job = params.pop("ow_job", None)
    job = start_job(InspectJob, params, ow_job)
    provide_hf_token(job)
    return run_once(job, _evaluate)


inspect_eval = flow(name="eval")(with_params_signature(inspect_eval, InspectParams))

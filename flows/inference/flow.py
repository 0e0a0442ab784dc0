"""`inference` (deployment `inference/batch`): a conversations file through a model with vLLM's offline engine.

The flow downloads the input (and the LoRA adapter, if any) from storage, runs `runner.py` in vLLM's own
environment (`OW_VLLM_PYTHON`; Prefect and vLLM cannot share one), streams its progress lines into the run's
logs, and stores the rows with their completions as a `result` file named in `job.outputs["result_file"]`.
OpenAI models (deployment `inference/openai`, no GPU and no vLLM) go to OpenAI instead: `openai_models.py`
(not `openai.py`: Prefect puts this directory on sys.path, where it would shadow the openai package).
"""

from __future__ import annotations

import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Cancelled

from flows._runtime import RESULT_PURPOSE, JobRun, run_job, stream_command, with_params_signature
from flows._vllm import adapter_rank, fit_max_model_len, optimization_level, vllm_env, vllm_python
from flows.inference.openai_models import BatchesCancelled, run_openai
from ow_prefect.jobs.inference import InferenceJob, InferenceParams

RUNNER = Path(__file__).with_name("runner.py")


def _infer(job: JobRun) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = InferenceParams(**job.parameters)
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        work = Path(tmp)
        if cfg.is_openai:
            return run_openai(job, cfg, work)
        input_path = job.storage.download(cfg.input_file_id, work / "input.jsonl")
        adapter_dir = job.storage.download(cfg.adapter, work / "adapter") if cfg.adapter else None
        runner_config = {
            "model": cfg.base_model,
            "adapter": str(adapter_dir) if adapter_dir else None,
            "lora_rank": adapter_rank(adapter_dir) if adapter_dir else None,
            "input": str(input_path),
            "output": str(work / "output.jsonl"),
            "max_tokens": cfg.max_tokens,
            "min_tokens": cfg.min_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "stop": cfg.stop,
            "prefill": cfg.prefill,
            "logprobs": cfg.logprobs,
            "n": cfg.n_completions_per_prompt,
            "max_model_len": fit_max_model_len(cfg.base_model, cfg.max_model_len),
            "quantization": cfg.quantization,
            "load_format": cfg.load_format,
            "chat_template": cfg.chat_template,
            "seed": cfg.seed,
        }
        logger.info("vLLM: %s%s", cfg.base_model, f" + adapter {cfg.adapter}" if cfg.adapter else "")
        summary = run_runner(runner_config, work)
        result = job.storage.put_path(work / "output.jsonl", RESULT_PURPOSE)
    logger.info(
        "%s rows, %s tokens generated in %s s", summary["rows"], summary["generated_tokens"], summary["seconds"]
    )
    return {"result_file": result.id, **summary}


def run_runner(config: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run `runner.py` in vLLM's environment with `config` (its keys: see the runner), its progress lines
    streamed into the run's logs; returns its summary ({rows, generated_tokens, seconds})."""
    config = {**config, "summary": str(work / "summary.json"), "optimization_level": optimization_level()}
    (work / "config.json").write_text(json.dumps(config))
    python, config_path = shlex.quote(str(vllm_python())), shlex.quote(str(work / "config.json"))
    stream_command(f"{python} {shlex.quote(str(RUNNER))} --config {config_path}", cwd=str(work), env=vllm_env())
    return json.loads((work / "summary.json").read_text())


def inference(**params: Any) -> dict[str, Any]:
    """Run a conversations file through a model (base or LoRA adapter) with vLLM; store the completions."""
    try:
        return run_job(InferenceJob, params, _infer)
    except BatchesCancelled as cancelled:  # noticed by polling (embedded runs have no supervisor to stop them)
        return Cancelled(message=str(cancelled))


inference = flow(name="inference")(with_params_signature(inference, InferenceParams))

"""`logprob` (deployment `logprob/blocks`): the logprob a model gives every content block of a conversations
file, with transformers (a LoRA adapter through PEFT), stored as a `result` file (`job.outputs["result_file"]`).

Each output row is the input row with every message's content as blocks, and each block with `logprobs` (the
sum over its tokens) and `num_tokens` — the same computation as the fine-tuning job's logprob callback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows._runtime import RESULT_PURPOSE, JobRun, provide_hf_token, run_once, start_job, with_params_signature
from ow_prefect.jobs.logprob import LogprobJob, LogprobParams


def load(base: str, adapter_dir: Path | None, chat_template: str):
    """The model (base, or base + adapter) in evaluation mode, and its tokenizer (the adapter's when saved
    with it: training stores the tokenizer it used next to the adapter)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.finetune.backends import compute_dtype
    from flows.finetune.data import prepare_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype()).to(device)
    tokenizer_source = base
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if (adapter_dir / "tokenizer_config.json").exists():
            tokenizer_source = str(adapter_dir)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_source), chat_template)
    return model.eval(), tokenizer


def _logprobs(job: JobRun) -> dict[str, Any]:
    from flows.finetune.data import jsonl_bytes, read_jsonl
    from flows.finetune.logprobs import score

    logger = get_run_logger()
    cfg = LogprobParams(**job.parameters)
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        work = Path(tmp)
        rows = read_jsonl(job.storage.download(cfg.dataset, work / "dataset.jsonl"))
        adapter_dir = job.storage.download(cfg.adapter, work / "adapter") if cfg.adapter else None
        logger.info(
            "logprobs of %s rows under %s%s", len(rows), cfg.base_model, f" + {cfg.adapter}" if cfg.adapter else ""
        )
        model, tokenizer = load(cfg.base_model, adapter_dir, cfg.chat_template)
        scored = score(model, tokenizer, rows, cfg.batch_size, responses_only=True)
    result = job.storage.put_bytes(jsonl_bytes(scored.rows), RESULT_PURPOSE, filename="logprobs.jsonl")
    return {
        "result_file": result.id,
        "rows": len(rows),
        "loss": scored.loss,
        "files": {"logprobs.jsonl": result.id},
    }


def logprob(**params: Any) -> dict[str, Any]:
    """Summed logprob of every content block of a conversations file under a model (base or LoRA adapter)."""
    ow_job = params.pop("ow_job", None)
    job = start_job(LogprobJob, params, ow_job)
    provide_hf_token(job)
    return run_once(job, _logprobs)


logprob = flow(name="logprob")(with_params_signature(logprob, LogprobParams))

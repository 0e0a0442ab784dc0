"""Logprobs of conversations under a model: the `logprob` job type (OpenWeights' `ow.logprob`)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator

from ow_prefect.jobs.base import Job
from ow_prefect.jobs.finetune import conversations_file
from ow_prefect.jobs.inference import ServedModel
from ow_prefect.jobs.registry import register


class LogprobParams(ServedModel):
    """Parameters of the `logprob` flow."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="'conversations' file id; message content may be blocks {'type': 'text', 'text': ..., 'tag': ...}."
    )
    batch_size: int = Field(default=8, ge=1, description="Conversations per forward pass.")
    chat_template: str = Field(
        default="default", description="'default' keeps the tokenizer's template (ChatML when it has none)."
    )
    requires_vram_gb: int | None = Field(default=None, ge=0, description="GPU memory; default: estimated.")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        from ow_prefect.storage import Storage

        conversations_file("dataset", value)
        if not Storage.from_settings().exists(value):
            raise ValueError(f"file {value} is not in storage (OW_STORAGE_BLOCK / OW_HOME): upload it first")
        return value


@register("logprob")
class LogprobJob(Job):
    """Summed logprob of every content block of every conversation, with transformers (+ PEFT for adapters)."""

    deployment = "logprob/blocks"
    entrypoint = "flows/logprob.py:logprob"
    params = LogprobParams
    code = ("flows/logprob.py", "flows/finetune/logprobs.py", "flows/finetune/data.py", "flows/_runtime.py")
    id_prefix = "lpjob"

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """A Hugging Face LoRA adapter given as `model` is stored and referenced first."""
        from ow_prefect.jobs.adapters import with_adapter_model

        return with_adapter_model(params, storage)

    @classmethod
    def job_variables(cls, validated: LogprobParams) -> dict[str, Any]:
        from ow_prefect.jobs.vram import estimate_vram_gb, vram_variables

        # a forward pass without optimizer states: the training estimate is an upper bound
        return vram_variables(
            validated,
            estimate_vram_gb,
            validated.base_model,
            load_in_4bit=False,
            max_seq_length=2048,
            batch_size=validated.batch_size,
        )

    @classmethod
    def work(cls, validated: LogprobParams, storage: Any) -> Any:
        """One forward pass over every row (transformers, as training does: a third of a training step's FLOPs)."""
        from ow_prefect.costs.work import file_tokens, model_work

        work = model_work(validated.base_model)
        work.train_tokens = file_tokens(storage, validated.dataset).tokens
        work.train_flops_factor = 1 / 3
        return work

"""Batch inference with vLLM: the parameters, model references, and the `inference` job type."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ow_prefect.jobs.base import Job, JobIdSuffix
from ow_prefect.jobs.registry import register
from ow_prefect.openai_names import is_openai as is_openai_name
from ow_prefect.storage import ID_RE


class ModelRef(BaseModel):
    """A base model plus, optionally, a LoRA adapter from storage: what a fine-tuning job's
    ``outputs["model"]`` holds, and what inference and serving load (the adapter as a vLLM LoRA request)."""

    model_config = ConfigDict(extra="ignore")

    base: str = Field(min_length=1, description="Base model: a Hub id or a local directory.")
    adapter: str | None = Field(default=None, description="File id of a LoRA adapter directory (or a checkpoint).")
    job: str | None = Field(default=None, description="The fine-tuning job that made the adapter, if any.")
    name: str | None = Field(
        default=None, description="The name the adapter is served under (a Hugging Face adapter's repo id or path)."
    )

    @field_validator("adapter")
    @classmethod
    def _adapter_id(cls, value: str | None) -> str | None:
        if value is not None and not (ID_RE.match(value) and ":dir-" in value):
            raise ValueError(f"{value!r} is not the file id of a directory (an adapter is stored as 'adapter:dir-…')")
        return value


LATEST_FINETUNE = "ftjob:latest"


def newest_finetune_job() -> str:
    """The id of the fine-tuning job that completed last (what ``model="ftjob:latest"`` means; a scheduled eval
    uses it to follow the newest model)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    from ow_prefect.jobs.submit import JOB_TAG, type_tag

    completed = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
    flow_runs = FlowRunFilter(tags=FlowRunFilterTags(all_=[type_tag("fine_tuning")]), state=completed)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=flow_runs, sort=FlowRunSort.END_TIME_DESC, limit=1)
    for tag in runs[0].tags if runs else []:
        if tag.startswith(f"{JOB_TAG}:"):
            return tag.split(":", 1)[1]
    raise ValueError(f"{LATEST_FINETUNE}: no fine-tuning job has completed yet")


def resolve_model(value: Any) -> Any:
    """A fine-tuning job id (``ftjob-…``, or ``ftjob:latest`` for the newest completed one) becomes its model
    reference (base + adapter), read from storage; anything else is returned as it is. For a checkpoint, pass
    ``{"base": ..., "adapter": <one of the job's outputs["checkpoints"]>}``."""
    if value == LATEST_FINETUNE:
        value = newest_finetune_job()
    if not isinstance(value, str) or not value.startswith("ftjob-"):
        return value
    from ow_prefect.hashing import is_job_id

    if not is_job_id(value):
        raise ValueError(f"{value!r} is not a fine-tuning job id (like 'ftjob-0123456789ab')")
    from ow_prefect.errors import NotFoundError
    from ow_prefect.jobs.submit import outputs_key
    from ow_prefect.storage import Storage

    try:
        outputs = Storage.from_settings().get_json(outputs_key(value))
    except NotFoundError:
        raise ValueError(f"fine-tuning job {value} has no outputs yet: wait until it completes") from None
    return dict(outputs["model"])


class ServedModel(BaseModel):
    """The `model` field of every job that serves one model with vLLM, resolved when validated."""

    model_config = ConfigDict(extra="forbid")

    model: str | ModelRef = Field(
        description="A Hub id, a local directory, a fine-tuning job id ('ftjob-…'; 'ftjob:latest' for the newest "
        "completed one), or a model reference {'base': ..., 'adapter': 'adapter:dir-…'} (a fine-tuning job's "
        "outputs['model']; a checkpoint id works too)."
    )

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> Any:
        return resolve_model(value)

    @property
    def base_model(self) -> str:
        return self.model.base if isinstance(self.model, ModelRef) else self.model

    @property
    def adapter(self) -> str | None:
        return self.model.adapter if isinstance(self.model, ModelRef) else None


class InferenceParams(ServedModel):
    """Parameters of the `inference` flow (parity with OpenWeights' inference config)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(
        description="File id of a 'conversations' file; a trailing assistant message is continued as a prefix."
    )
    max_tokens: int = Field(default=600, ge=1, description="Most tokens generated per completion.")
    min_tokens: int = Field(default=1, ge=0, description="Fewest tokens per completion (EOS and stop held back).")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (not included).")
    prefill: str = Field(default="", description="Text the assistant's answer starts with (continued, not repeated).")
    logprobs: int | None = Field(default=None, ge=0, le=20, description="Top-k logprobs per generated token.")
    n_completions_per_prompt: int = Field(default=1, ge=1, description="Completions per row (a list when > 1).")
    max_model_len: int = Field(
        default=2048, ge=16, description="Context length (prompt + completion); capped at the model's own maximum."
    )
    quantization: str | None = Field(default=None, description="vLLM quantization (awq, gptq, fp8, ...).")
    load_format: str | None = Field(
        default=None,
        description="vLLM load format ('bitsandbytes' for unsloth's 4-bit checkpoints, with quantization).",
    )
    chat_template: str | None = Field(default=None, description="Jinja chat template instead of the tokenizer's.")
    seed: int | None = Field(default=None, description="Sampling seed: same seed, same completions.")
    requires_vram_gb: int | None = Field(default=None, ge=0, description="GPU memory; default: estimated.")
    job_id_suffix: JobIdSuffix = Field(default=None, description="Appended to the job id (lowercase, digits, -_).")
    use_batch: bool | None = Field(
        default=None,
        description="OpenAI models only ('openai/…'): True (the default for them) sends the rows through OpenAI's "
        "Batch API (half the price, done within 24 h); False through the chat client (answers at once).",
    )

    @field_validator("input_file_id")
    @classmethod
    def _input_file(cls, value: str) -> str:
        match = ID_RE.match(value)
        if not match or match["purpose"] != "conversations" or match["kind"] != "file":
            raise ValueError(
                f"{value!r} is not a 'conversations' file id; upload the input with "
                "ow.files.upload(path, purpose='conversations')"
            )
        from ow_prefect.storage import Storage

        if not Storage.from_settings().exists(value):  # validated when it was uploaded; it must still be there
            raise ValueError(f"file {value} is not in storage (OW_STORAGE_BLOCK / OW_HOME): upload it first")
        return value

    @model_validator(mode="after")
    def _lengths(self) -> InferenceParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens})")
        if self.temperature == 0 and self.n_completions_per_prompt > 1:
            raise ValueError(
                "n_completions_per_prompt > 1 needs temperature > 0: greedy decoding writes the same completion n times"
            )
        if not self.is_openai:
            if self.use_batch is not None:
                raise ValueError("use_batch applies to OpenAI models ('openai/<name>') only; remove it for vLLM models")
            return self
        self._check_openai()
        if self.use_batch is None:
            self.use_batch = True  # as in OpenWeights; resolved here, so the job id names what runs
        return self

    @property
    def is_openai(self) -> bool:
        return isinstance(self.model, str) and is_openai_name(self.model)

    def _check_openai(self) -> None:
        """Refuse what OpenAI's chat API cannot do, before anything is sent (OpenWeights dropped it silently)."""
        fields = type(self).model_fields
        vllm_only = [name for name in VLLM_ONLY_FIELDS if getattr(self, name) != fields[name].default]
        if vllm_only:
            raise ValueError(f"{', '.join(vllm_only)}: vLLM settings, not for OpenAI model {self.model!r}; remove them")
        if self.prefill:
            raise ValueError("prefill: OpenAI's chat API cannot continue an assistant message; remove it")
        if self.min_tokens > 1:
            raise ValueError("min_tokens: OpenAI's chat API has no minimum length; remove it (or set it to 0 or 1)")
        if len(self.stop) > OPENAI_MAX_STOP:
            raise ValueError(f"stop: OpenAI takes at most {OPENAI_MAX_STOP} stop strings, not {len(self.stop)}")
        problems = openai_row_problems(self.input_file_id)
        if problems:
            raise ValueError(f"input_file_id: {len(problems)} rows OpenAI cannot answer: " + "; ".join(problems[:5]))


VLLM_ONLY_FIELDS = ("chat_template", "max_model_len", "quantization", "load_format", "requires_vram_gb")
OPENAI_MAX_STOP = 4


def openai_row_problems(file_id: str) -> list[str]:
    """Rows of a conversations file that OpenAI's chat API cannot answer: raw text (a `text` row) and
    conversations ending with an assistant message (a prefix to continue)."""
    import json

    from ow_prefect.storage import Storage

    problems = []
    lines = Storage.from_settings().get_bytes(file_id).decode("utf-8").splitlines()
    for number, line in enumerate((line for line in lines if line.strip()), start=1):
        row = json.loads(line)
        if "messages" not in row:
            problems.append(f"line {number}: raw text, not 'messages' (OpenAI's chat API takes conversations only)")
        elif row["messages"] and row["messages"][-1].get("role") == "assistant":
            problems.append(f"line {number}: ends with an assistant message, which OpenAI cannot continue")
    return problems


class ServingJob(Job):
    """A job that serves one model with vLLM (base, or base + adapter): the serving image, and job variables
    asking for the GPU memory its parameters need (`base_model`, `adapter`, `max_model_len`, `quantization`,
    `requires_vram_gb`). A Hugging Face LoRA adapter given as `model` is stored and referenced first."""

    image_setting = "serve_image"

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        from ow_prefect.jobs.adapters import with_adapter_model

        return with_adapter_model(params, storage)

    @classmethod
    def job_variables(cls, validated: Any) -> dict[str, Any]:
        from ow_prefect.jobs.vram import single_model_vram_gb, vram_variables

        return vram_variables(validated, single_model_vram_gb, validated)


@register("inference")
class InferenceJob(ServingJob):
    """Runs a conversations file through a model (base or LoRA adapter) with vLLM's offline engine, or through
    an OpenAI model ('openai/<name>') with OpenAI's Batch API or the chat client; the same result file."""

    deployment = "inference/batch"
    entrypoint = "flows/inference/flow.py:inference"
    params = InferenceParams
    code = ("flows/inference", "flows/_runtime.py", "flows/_vllm.py")
    id_prefix = "inferencejob"
    other_deployments = ("inference/openai",)  # OpenAI models (listed in docs/reference.md)

    @classmethod
    def deployment_for(cls, validated: InferenceParams) -> str:
        """OpenAI models need no GPU: `inference/openai` runs on a process pool (prefect.yaml's `local`)."""
        return OPENAI_DEPLOYMENT if validated.is_openai else cls.deployment

    @classmethod
    def job_variables(cls, validated: InferenceParams) -> dict[str, Any]:
        return {} if validated.is_openai else super().job_variables(validated)

    @classmethod
    def work(cls, validated: InferenceParams, storage: Any) -> Any:
        """Every prompt once (vLLM's prefix cache shares it between the n completions of a row), and up to
        max_tokens generated per completion (half of it expected)."""
        from ow_prefect.costs.work import Work, file_tokens, generation, model_work

        if validated.is_openai:
            return Work(notes=["an OpenAI model: OpenAI bills the tokens (half price with use_batch); no GPU"])
        work = model_work(validated.base_model, quantized=validated.quantization is not None)
        data = file_tokens(storage, validated.input_file_id)
        rows = data.rows or data.tokens / 500  # a prompt of ~500 tokens when the file is too big to count rows
        work.prefill_tokens = data.tokens
        work.decode_tokens = generation(rows, validated.max_tokens, validated.n_completions_per_prompt)
        work.sequence_tokens = min(validated.max_model_len, data.per_row + validated.max_tokens / 2)
        return work


OPENAI_DEPLOYMENT = InferenceJob.other_deployments[0]

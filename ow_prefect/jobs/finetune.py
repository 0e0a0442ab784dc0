"""Fine-tuning with LoRA (SFT, DPO, ORPO): the parameters, their rules, and the `finetune` job type."""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ow_prefect.jobs.base import Job, parameter_error, register
from ow_prefect.storage import ID_RE

Loss = Literal["sft", "dpo", "orpo", "weighted_sft"]
DATA_PURPOSE: dict[str, str] = {
    "sft": "conversations",
    "dpo": "preference",
    "orpo": "preference",
    "weighted_sft": "conversations",
}
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_ID_FIELDS = {"job_id", "model_name", "org"}
SUFFIX_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
Every = int | Literal["log"]
EVERY_HELP = "an integer N (every N steps) or 'log' (steps 1-9, 10, 20, ..., 100, 200, ...); also step 0 and the last"


def conversations_file(field: str, value: str) -> str:
    """`value` if it is a 'conversations' file id, else an error naming `field` and how to make one."""
    match = ID_RE.match(value)
    if not match or match["purpose"] != "conversations" or match["kind"] != "file":
        raise ValueError(
            f"{field}: {value!r} is not a 'conversations' file id; upload it with "
            "ow.files.upload(path, purpose='conversations')"
        )
    return value


def check_tag(field: str, tag: str) -> str:
    if not TAG_RE.match(tag):
        raise ValueError(f"{field}: tag {tag!r} must be 1-64 letters, digits, '.', '-' or '_' (it names result files)")
    return tag


def check_every(field: str, value: Every) -> Every:
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{field}: {value} must be at least 1, or 'log'")
    return value


class SamplingCallback(BaseModel):
    """One sampling callback: completions of `dataset`'s prompts every `eval_steps` while training runs."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="'conversations' file id of the prompts (a trailing assistant message is a prefix)."
    )
    eval_steps: Every = Field(default="log", description=f"When to sample: {EVERY_HELP}.")
    tag: str = Field(default="samples", description="Name of this callback's events and result files.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature; 0 is greedy.")
    max_tokens: int = Field(default=600, ge=1, description="Most tokens per completion.")
    batch_size: int = Field(default=8, ge=1, description="Prompts generated at once.")

    @model_validator(mode="after")
    def _fields(self) -> SamplingCallback:
        conversations_file("dataset", self.dataset)
        check_tag("tag", self.tag)
        check_every("eval_steps", self.eval_steps)
        return self


class FineTuningParams(BaseModel):
    """Parameters of the `finetune` flow (parity with OpenWeights' training config)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Base model: a Hugging Face Hub id or a local directory.")
    training_file: str = Field(
        description="File id of the training data: 'conversations:…' for sft and weighted_sft, 'preference:…' for "
        "dpo and orpo (`ow files upload FILE --purpose preference` prints it)."
    )
    test_file: str | None = Field(default=None, description="File id of evaluation data (same kind).")
    loss: Loss = Field(
        default="sft",
        description="Training objective: sft, dpo, orpo or weighted_sft. Each finetune/* deployment presets its own "
        "(finetune/dpo: dpo, finetune/weighted-sft: weighted_sft); dpo and orpo train on a 'preference' file, sft "
        "and weighted_sft on a 'conversations' one.",
    )
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA alpha (scaling numerator).")
    lora_dropout: float = Field(default=0.0, ge=0, le=1, description="LoRA dropout, 0 to 1.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), description="Modules that get LoRA adapters."
    )
    lora_bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases to train.")
    use_rslora: bool = Field(default=True, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    load_in_4bit: bool = Field(default=False, description="Load the base model in 4-bit (QLoRA; CUDA only).")
    max_seq_length: int = Field(default=2048, ge=16, description="Longest sequence in tokens; longer rows are cut.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training data (unless max_steps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    per_device_train_batch_size: int = Field(default=2, ge=1, description="Rows per device per step.")
    gradient_accumulation_steps: int = Field(default=8, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(
        default=1e-4,
        description="Learning rate; a negative number x means 10**x (-4 is 1e-4); numeric strings are accepted.",
    )
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field(default="linear", description="LR schedule.")
    warmup_steps: int = Field(default=5, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    optim: Literal["adamw_8bit", "adamw", "adamw_torch", "adam", "sgd", "adafactor"] = Field(
        default="adamw_8bit", description="Optimizer; adamw_8bit needs CUDA (adamw_torch is used on CPU)."
    )
    seed: int = Field(default=3407, description="Random seed.")
    beta: float = Field(default=0.1, gt=0, description="DPO/ORPO beta (ignored for SFT).")
    train_on_responses_only: bool = Field(default=True, description="SFT: loss on assistant tokens only.")
    packing: bool = Field(default=False, description="SFT: pack several rows into one sequence.")
    logging_steps: int = Field(default=1, ge=1, description="Log metrics every N steps.")
    save_steps: int = Field(default=5000, ge=1, description="Checkpoint (to storage) every N steps.")
    test_file_eval_strategy: Literal["no", "steps", "epoch"] = Field(
        default="epoch", description="When to evaluate on test_file: no, steps (see test_file_eval_steps), epoch."
    )
    test_file_eval_steps: int | None = Field(default=None, ge=1, description="Evaluate every N steps.")
    eval_batch_size: int = Field(default=8, ge=1, description="Batch size for test_file evaluation.")
    merge_before_push: bool | None = Field(
        default=None,
        description="Also store (and push) the merged model, not only the adapter. Default: yes, except for "
        "4-bit models.",
    )
    push_to_private: bool = Field(default=True, description="Hub repository visibility when pushing.")
    finetuned_model_id: str = Field(
        default="{org}/{model_name}-{job_id}",
        description="Hub repo to push to (needs an HF token Secret block); placeholders {org}, {model_name}, {job_id}.",
    )
    job_id_suffix: str | None = Field(default=None, description="Appended to the job id (lowercase, digits, -_).")
    chat_template: str = Field(
        default="default",
        description="'default' keeps the tokenizer's template (ChatML "
        "when it has none); any other value is used as the Jinja template.",
    )
    logp_callback_datasets: dict[str, str] = Field(
        default_factory=dict,
        description="{tag: 'conversations' file id}: at step 0 and every eval_every_n_steps, each dataset's mean "
        "per-token loss becomes an event and its tokens' (and blocks') logprobs a result file.",
    )
    eval_every_n_steps: Every = Field(default="log", description=f"When logp_callback_datasets run: {EVERY_HELP}.")
    sampling_callbacks: list[SamplingCallback] = Field(
        default_factory=list,
        description="Completions of a dataset's prompts while training runs: [{dataset, eval_steps, tag, "
        "temperature, max_tokens, batch_size}].",
    )
    meta: dict[str, Any] | None = Field(default=None, description="Free-form metadata kept with the job.")
    requires_vram_gb: int | None = Field(
        default=None, ge=0, description="GPU memory to ask for; default: estimated from the model's config."
    )

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _learning_rate(cls, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"learning_rate {value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("learning_rate must be a number")
        if value == 0:
            raise ValueError("learning_rate must not be 0: give a positive rate or a negative exponent (-4 = 1e-4)")
        return float(10**value if value < 0 else value)

    @field_validator("finetuned_model_id")
    @classmethod
    def _model_id(cls, value: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        unknown = fields - MODEL_ID_FIELDS
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {sorted(MODEL_ID_FIELDS)}")
        if value.count("/") != 1:
            raise ValueError(f"{value!r} must look like 'org/name'")
        return value

    @field_validator("job_id_suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and not SUFFIX_RE.match(value):
            raise ValueError("use up to 32 lowercase letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> FineTuningParams:
        purpose = DATA_PURPOSE[self.loss]
        for field in ("training_file", "test_file"):
            value = getattr(self, field)
            if value is None:
                continue
            match = ID_RE.match(value)
            if not match:
                raise ValueError(
                    f"{field}: {value!r} is not a file id; upload it with ow.files.upload(path, purpose={purpose!r})"
                )
            if match["purpose"] != purpose:
                raise ValueError(
                    f"{field}: loss={self.loss!r} needs a '{purpose}' file, got a '{match['purpose']}' file ({value})"
                )
        self._check_callbacks()
        if self.loss == "weighted_sft" and self.packing:
            raise ValueError("packing: weighted SFT keeps each row's token weights apart; set packing=False")
        if self.test_file and self.test_file_eval_strategy == "steps" and not self.test_file_eval_steps:
            raise ValueError("test_file_eval_strategy='steps' needs test_file_eval_steps")
        if self.merge_before_push is None:
            self.merge_before_push = not self.load_in_4bit
        elif self.load_in_4bit and self.merge_before_push:
            raise ValueError(
                "merge_before_push cannot be used with load_in_4bit (merging into 4-bit weights "
                "loses the adapter's precision); set merge_before_push=False"
            )
        return self

    def _check_callbacks(self) -> None:
        for tag, file_id in self.logp_callback_datasets.items():
            check_tag("logp_callback_datasets", tag)
            conversations_file(f"logp_callback_datasets[{tag!r}]", file_id)
        check_every("eval_every_n_steps", self.eval_every_n_steps)
        tags = [c.tag for c in self.sampling_callbacks]
        if len(set(tags)) < len(tags):
            raise ValueError(f"sampling_callbacks: tags {tags} repeat; give each callback its own tag")
        if self.load_in_4bit and self.logp_callback_datasets:
            raise ValueError(
                "logp_callback_datasets cannot be used with load_in_4bit=True (logprob tracking is not supported "
                "on 4-bit models); set load_in_4bit=False or drop logp_callback_datasets"
            )


class WeightedSFTParams(FineTuningParams):
    """Parameters of token-weighted SFT: the fine-tuning parameters, with block weights in the training data."""

    loss: Literal["weighted_sft"] = Field(
        default="weighted_sft", description="Token-weighted SFT: loss = sum(w * CE) / sum(|w|) over tokens."
    )


@register("fine_tuning")
class FineTuneJob(Job):
    """LoRA fine-tuning with TRL; unsloth where it is installed, transformers + PEFT otherwise."""

    deployment = "finetune/sft"
    entrypoint = "flows/finetune/flow.py:finetune"
    params = FineTuningParams
    code = ("flows/finetune", "flows/_runtime.py")
    id_prefix = "ftjob"
    losses: tuple[str, ...] = ("sft", "dpo", "orpo")

    @classmethod
    def validate_params(cls, **kwargs: Any) -> BaseModel:
        validated = super().validate_params(**kwargs)
        if validated.loss not in cls.losses:
            other = "weighted_sft" if validated.loss == "weighted_sft" else "fine_tuning"
            raise parameter_error(cls, [f"loss: {validated.loss!r} belongs to job type {other}: use ow.{other}.create"])
        return validated

    @classmethod
    def deployment_for(cls, validated: FineTuningParams) -> str:
        return f"finetune/{validated.loss.replace('_', '-')}"

    @classmethod
    def compute_id(cls, flow_parameters: dict[str, Any], image: str | None = None, code: str | None = None) -> str:
        job_id = super().compute_id(flow_parameters, image, code)
        suffix = flow_parameters.get("job_id_suffix")
        return f"{job_id}-{suffix}" if suffix else job_id

    @classmethod
    def job_variables(cls, validated: FineTuningParams) -> dict[str, Any]:
        from ow_prefect.jobs.vram import estimate_vram_gb

        vram = validated.requires_vram_gb
        if vram is None:
            vram = estimate_vram_gb(
                validated.model,
                load_in_4bit=validated.load_in_4bit,
                max_seq_length=validated.max_seq_length,
                batch_size=validated.per_device_train_batch_size,
            )
        return {"min_vram_gb": vram}


@register("weighted_sft")
class WeightedSFTJob(FineTuneJob):
    """Token-weighted SFT on block-formatted conversations (block `weight`: 0 ignores, negative unlearns).
    Its id starts with ftjob- like every fine-tuning job, so inference, APIs and evals take it the same way."""

    deployment = "finetune/weighted-sft"
    params = WeightedSFTParams
    losses = ("weighted_sft",)


def job_class_for(loss: str) -> type[FineTuneJob]:
    """The job type whose flow runs train with `loss` (the `finetune` flow serves both)."""
    return WeightedSFTJob if loss == "weighted_sft" else FineTuneJob

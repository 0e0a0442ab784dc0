"""Fine-tuning with LoRA (SFT, DPO, ORPO): the parameters, their rules, and the `finetune` job type."""

from __future__ import annotations

import ast
import operator
import os
import re
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ow_prefect.jobs.base import Job, JobIdSuffix, parameter_error
from ow_prefect.jobs.registry import register
from ow_prefect.settings import get_settings
from ow_prefect.storage import ID_RE

Loss = Literal["sft", "dpo", "orpo", "weighted_sft"]
DATA_PURPOSE: dict[str, str] = {
    "sft": "conversations",
    "dpo": "preference",
    "orpo": "preference",
    "weighted_sft": "conversations",
}
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ORG_FIELDS = ("org", "org_id")  # {org_id} is OpenWeights' name
RUN_FIELDS = {"job_id", *ORG_FIELDS}  # filled when the id, and where the Hub organization, is known
# Fields OpenWeights' training config has and ow_prefect does not: why, and what to write instead.
UPSTREAM_ONLY = {
    "sdft_": "ow_prefect has no loss='sdft' (self-distillation); use sft, dpo, orpo or weighted_sft",
    "grpo_": "ow_prefect has no loss='grpo' (online RL); use sft, dpo, orpo or weighted_sft",
}
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


def client_hf_org() -> str | None:
    """The Hub organization known on this machine: ``OW_HF_ORG``, else OpenWeights' ``HF_ORG`` / ``HF_USER``."""
    return get_settings().hf_org or os.environ.get("HF_ORG") or os.environ.get("HF_USER") or None


class _KeepMissing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def fill_model_id(template: str, values: dict[str, Any]) -> str:
    """`template` with the placeholders `values` has filled in; the others stay as they are."""
    return string.Formatter().vformat(template, (), _KeepMissing({k: v for k, v in values.items() if v is not None}))


_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def arithmetic(text: str) -> float:
    """The value of an arithmetic expression of numbers (``"1e-4"``, ``"2e-5 * 4"``, ``"10**-4"``): what
    OpenWeights evaluates a string learning rate as, without running arbitrary code."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.operand))
        raise ValueError

    try:
        return float(value(ast.parse(text.strip(), mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        raise ValueError(
            f"learning_rate {text!r} is not a number or an arithmetic expression of numbers (e.g. '1e-4', '2e-5*4')"
        ) from None


class FineTuningParams(BaseModel):
    """Parameters of the `finetune` flow (parity with OpenWeights' training config)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _openweights_only_fields(cls, values: Any) -> Any:
        """OpenWeights' no-op keys are dropped (``is_peft=True``: always LoRA; ``output_dir``: the run's scratch
        directory); keys for what ow_prefect does not do are refused, saying so."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if values.get("is_peft", True) is not True:
            raise ValueError("is_peft=False: ow_prefect trains LoRA adapters only; remove is_peft")
        values.pop("is_peft", None)
        values.pop("output_dir", None)
        problems = [
            f"{key}: {why}" for key in values for prefix, why in UPSTREAM_ONLY.items() if key.startswith(prefix)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return values

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
        description="Learning rate; a negative number x means 10**x (-4 is 1e-4); a string is read as a number or "
        "an arithmetic expression of numbers ('1e-4', '2e-5*4'), as OpenWeights does.",
    )
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field(default="linear", description="LR schedule.")
    warmup_steps: int = Field(default=5, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm (0: no clipping).")
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
        description="Hub repo to push to (needs an HF token Secret block). Placeholders: {org} (or {org_id}: "
        "OW_HF_ORG, HF_ORG or HF_USER where the job is created, else the token's user), {model_name}, {job_id}, "
        "any other string parameter ({loss}, ...) and the keys of model_naming_extra_parameters.",
    )
    model_naming_extra_parameters: dict[str, str] | None = Field(
        default=None, description="More placeholders for finetuned_model_id: {name: value}."
    )
    ft_id_suffix: str | None = Field(default=None, description="Appended to finetuned_model_id as '-<suffix>'.")
    job_id_suffix: JobIdSuffix = Field(default=None, description="Appended to the job id (lowercase, digits, -_).")
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
            value = arithmetic(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("learning_rate must be a number")
        if value == 0:
            raise ValueError("learning_rate must not be 0: give a positive rate or a negative exponent (-4 = 1e-4)")
        return float(10**value if value < 0 else value)

    def naming_values(self) -> dict[str, Any]:
        """What fills finetuned_model_id's placeholders, but for {job_id} and {org}: every string parameter,
        {model_name} and model_naming_extra_parameters (as OpenWeights fills it)."""
        values = {name: value for name, value in self if isinstance(value, str)}
        values["model_name"] = Path(self.model.rstrip("/")).name
        return values | (self.model_naming_extra_parameters or {})

    def _fill_model_id(self) -> None:
        """Fill in what the parameters determine (the same here and in the flow, so the id is the same);
        {job_id} and {org} stay until they are known."""
        template = self.finetuned_model_id
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise ValueError(f"finetuned_model_id {template!r}: {exc}") from None
        values = self.naming_values()
        unknown = sorted(fields - RUN_FIELDS - set(values))
        if unknown:
            raise ValueError(
                f"finetuned_model_id: unknown placeholder(s) {unknown}; use {{org}}, {{model_name}}, {{job_id}}, a "
                "string parameter, or add them to model_naming_extra_parameters"
            )
        filled = fill_model_id(template, values)
        if self.ft_id_suffix:
            filled, self.ft_id_suffix = f"{filled}-{self.ft_id_suffix}", None
        if filled.count("/") != 1:
            raise ValueError(f"finetuned_model_id {filled!r} must look like 'org/name'")
        self.finetuned_model_id = filled

    @model_validator(mode="after")
    def _cross_field_rules(self) -> FineTuningParams:
        self._fill_model_id()
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
        default="weighted_sft",
        description="Token-weighted SFT: loss = sum(w * CE) / sum(|w|) over tokens ('sft', as OpenWeights' "
        "weighted_sft takes it, means the same).",
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _sft_is_weighted_here(cls, value: Any) -> Any:
        return "weighted_sft" if value == "sft" else value


@register("fine_tuning")
class FineTuneJob(Job):
    """LoRA fine-tuning with TRL; unsloth where it is installed, transformers + PEFT otherwise."""

    deployment = "finetune/sft"
    entrypoint = "flows/finetune/flow.py:finetune"
    params = FineTuningParams
    code = ("flows/finetune", "flows/_runtime.py")
    id_prefix = "ftjob"
    losses: tuple[str, ...] = ("sft", "dpo", "orpo")
    stops_at_checkpoint = True

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
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """{org} / {org_id} in finetuned_model_id are filled with the organization known here (OpenWeights fills
        them when the job is created); otherwise the run fills them from the HF token's user."""
        org = client_hf_org()
        template = params.get("finetuned_model_id", cls.params.model_fields["finetuned_model_id"].default)
        if org and isinstance(template, str):
            params = {**params, "finetuned_model_id": fill_model_id(template, dict.fromkeys(ORG_FIELDS, org))}
        return params

    @classmethod
    def shown_params(cls, params: dict[str, Any], job_id: str) -> dict[str, Any]:
        """``finetuned_model_id`` with its {job_id} filled in, as OpenWeights shows it."""
        template = params.get("finetuned_model_id")
        if not isinstance(template, str):
            return params
        return {**params, "finetuned_model_id": fill_model_id(template, {"job_id": job_id})}

    @classmethod
    def job_variables(cls, validated: FineTuningParams) -> dict[str, Any]:
        from ow_prefect.jobs.vram import estimate_vram_gb, vram_variables

        return vram_variables(
            validated,
            estimate_vram_gb,
            validated.model,
            load_in_4bit=validated.load_in_4bit,
            max_seq_length=validated.max_seq_length,
            batch_size=validated.per_device_train_batch_size,
        )

    @classmethod
    def work(cls, validated: FineTuningParams, storage: Any) -> Any:
        """Training tokens: each row of the training file cut at max_seq_length, times the epochs (or max_steps ×
        batch × accumulation rows); preference rows hold the prompt once but train it with each answer (×1.3), and
        DPO runs the reference model's forward too. Evaluations on test_file count as forward passes; merging and
        storing the merged model as the finish."""
        from ow_prefect.costs.work import file_tokens, model_work

        work = model_work(validated.model, quantized=validated.load_in_4bit)
        data = file_tokens(storage, validated.training_file, cap=validated.max_seq_length)
        per_epoch = data.capped * (1.3 if validated.loss in ("dpo", "orpo") else 1.0)
        rows_per_step = validated.per_device_train_batch_size * validated.gradient_accumulation_steps
        steps, tokens = None, per_epoch * validated.epochs
        if data.rows:
            steps = validated.max_steps or validated.epochs * data.rows / rows_per_step
            tokens = per_epoch / data.rows * steps * rows_per_step
        if validated.test_file and validated.test_file_eval_strategy != "no":
            evaluations = validated.epochs
            if validated.test_file_eval_strategy == "steps" and steps:
                evaluations = steps / (validated.test_file_eval_steps or validated.logging_steps)
            eval_tokens = file_tokens(storage, validated.test_file, cap=validated.max_seq_length).capped
            tokens += eval_tokens * evaluations / 3  # a forward pass is a third of a training step's FLOPs
        work.train_tokens = tokens
        work.train_flops_factor = 8 / 6 if validated.loss == "dpo" else 1.0
        work.sequence_tokens = validated.max_seq_length
        if validated.merge_before_push and work.params:
            work.extra_seconds = 2 * work.download_bytes / 1e9  # merge, save and store ~16-bit weights at ~1 GB/s
        if data.rows is None:
            work.notes.append("training file over 64 MB: its tokens come from its size, rows not cut")
        return work


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

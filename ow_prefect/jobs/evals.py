"""Evals against a model that the run serves itself with vLLM: inspect-ai tasks (`eval/inspect-ai`) and
MMLU-Pro (`eval/mmlu-pro`). The parameters, the translation of inspect options to its command line, and the
two job types (``ow.inspect_ai``, ``ow.mmlu_pro``)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from ow_prefect.jobs.custom import check_mount_path, check_mounts, upload_local_mounts, upload_mount
from ow_prefect.jobs.inference import ModelRef, ServedModel, ServingJob
from ow_prefect.jobs.registry import register
from ow_prefect.storage import ID_RE

TASK_FILE_SUFFIXES = (".py", ".ipynb", ".yaml", ".yml")
# what the flow sets itself: the model and its endpoint, where logs go and in which format, the display
RESERVED_OPTIONS = frozenset({"model", "model-base-url", "log-dir", "log-format", "display"})
ARTIFACT_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def slug(text: str, limit: int = 60) -> str:
    """Lowercase letters, digits and dashes (what Prefect allows in an artifact key)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "model"


class EvalParams(ServedModel):
    """What every eval shares: the model, how vLLM serves it, and where the scores are published."""

    max_model_len: int = Field(default=4096, ge=16, description="vLLM context length (capped at the model's).")
    max_num_seqs: int = Field(default=64, ge=1, description="Requests vLLM runs at once.")
    quantization: str | None = Field(default=None, description="vLLM quantization (awq, gptq, fp8, ...).")
    requires_vram_gb: int | None = Field(default=None, ge=0, description="GPU memory; default: estimated.")
    artifact_key: str | None = Field(
        default=None,
        description="Key of the scores table artifact. Runs that share a key form its history in the UI (a "
        "scheduled eval keeps one key to show the trend); default: from the eval and the model.",
    )

    @field_validator("artifact_key")
    @classmethod
    def _artifact_key(cls, value: str | None) -> str | None:
        if value is not None and not ARTIFACT_KEY_RE.match(value):
            raise ValueError(f"{value!r}: an artifact key holds lowercase letters, digits and dashes only")
        return value

    @property
    def model_label(self) -> str:
        """Who was evaluated, for tables and keys: the fine-tuning job, the adapter, or the base model."""
        if isinstance(self.model, ModelRef) and self.model.adapter:
            return self.model.job or self.model.adapter
        return self.base_model


class InspectParams(EvalParams):
    """Parameters of the `eval/inspect-ai` deployment."""

    eval_name: str = Field(
        min_length=1,
        description="An inspect task: a registry name ('inspect_evals/gpqa_diamond', from a package in the image) "
        "or a task file in the job's work dir ('arith.py', 'tasks/arith.py@addition'). The SDK uploads a local "
        "task file or directory and mounts it for you.",
    )
    mounts: dict[str, str] = Field(
        default_factory=dict, description="Path in the work dir -> file id, downloaded before `inspect eval` runs."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="`inspect eval` options, named as on its command line without the dashes: {'limit': 50, "
        "'epochs': 2, 'temperature': 0, 'max_tokens': 512, 'task_args': {'subset': 'x'}} (task_args → -T, "
        "model_args → -M; True is a bare flag); or the command line itself, as OpenWeights takes it: "
        "'--limit 50 --top-p 0.9 -T subset=x'.",
    )

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, mounts: dict[str, str]) -> dict[str, str]:
        return check_mounts(mounts)

    @field_validator("options", mode="before")
    @classmethod
    def _options_from_command_line(cls, options: Any) -> Any:
        return options_from_command_line(options) if isinstance(options, str) else options

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict[str, Any]) -> dict[str, Any]:
        inspect_cli_options(options)  # raises on a reserved or malformed option
        return options

    @model_validator(mode="after")
    def _task_file_is_mounted(self) -> InspectParams:
        path = task_file(self.eval_name)
        if path is not None:
            check_mount_path(path)
            if not any(path == target or path.startswith(f"{target}/") for target in self.mounts):
                raise ValueError(
                    f"eval_name {self.eval_name!r} is a task file, but nothing is mounted at {path!r}: pass the "
                    "local path to the SDK (it uploads it), or mounts={path: file id}"
                )
        return self


def task_file(eval_name: str) -> str | None:
    """The file part of `eval_name` when it names a task file (`path.py` or `path.py@task`), else None."""
    path = eval_name.split("@", 1)[0]
    return path if path.endswith(TASK_FILE_SUFFIXES) else None


def options_from_command_line(text: str) -> dict[str, Any]:
    """`inspect eval` options given as its command line (``"--limit 5 --top-p 0.9 --no-score -T subset=x"``) as
    the mapping `inspect_cli_options` turns back into it; a flag without a value is True."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"options {text!r}: {exc}") from None
    options: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-T", "-M", "--task-args", "--model-args"):
            if i + 1 >= len(words) or "=" not in words[i + 1]:
                raise ValueError(f"options {text!r}: {word} takes name=value")
            name, _, value = words[i + 1].partition("=")
            options.setdefault("task_args" if word in ("-T", "--task-args") else "model_args", {})[name] = value
            i += 2
            continue
        if not word.startswith("--") or len(word) < 3:
            raise ValueError(
                f"options {text!r}: {word!r} is not an option; write '--name value' or '--flag' (e.g. '--limit 50')"
            )
        name, has_value, value = word[2:].partition("=")
        if not has_value and i + 1 < len(words) and not words[i + 1].startswith("-"):
            value, has_value, i = words[i + 1], True, i + 1
        options[name.replace("-", "_")] = value if has_value else True
        i += 1
    return options


def inspect_cli_options(options: dict[str, Any]) -> list[str]:
    """`inspect eval` arguments for `options` (see `InspectParams.options`)."""
    args: list[str] = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if flag in ("task-args", "t", "model-args", "m"):
            if not isinstance(value, dict):
                raise ValueError(f"options[{key!r}] must be a mapping of argument -> value")
            short = "-T" if flag in ("task-args", "t") else "-M"
            for name, item in value.items():
                args += [short, f"{name}={item if isinstance(item, str) else json.dumps(item)}"]
            continue
        if not re.fullmatch(r"[a-z][a-z0-9-]*", flag):
            raise ValueError(f"options[{key!r}] is not an `inspect eval` option name (e.g. 'limit', 'max_tokens')")
        if flag in RESERVED_OPTIONS:
            raise ValueError(f"options[{key!r}] is set by the eval flow itself; leave it out")
        if value is None or value is False:
            continue
        if value is True:
            args.append(f"--{flag}")
        elif isinstance(value, list | tuple):
            args += [f"--{flag}", ",".join(str(item) for item in value)]
        elif isinstance(value, dict):
            raise ValueError(f"options[{key!r}] must be a scalar or a list, not a mapping")
        else:
            args += [f"--{flag}", str(value)]
    return args


class MmluProParams(EvalParams):
    """Parameters of the `eval/mmlu-pro` deployment (chain-of-thought, as in TIGER-Lab's reference)."""

    dataset: str = Field(
        default="TIGER-Lab/MMLU-Pro",
        description="The Hub dataset, or a local copy: a directory with its 'test' and 'validation' splits (the "
        "Hub's data/*.parquet layout, or test.jsonl + validation.jsonl), or the file id of such a directory. The SDK "
        "uploads a local directory for you.",
    )
    ntrain: int = Field(default=5, ge=0, le=20, description="Few-shot examples per question (same subject).")
    selected_subjects: str = Field(
        default="all", description="'all', or comma-separated subjects (a part of the name is enough: 'math,law')."
    )
    max_tokens: int = Field(default=2048, ge=1, description="Most tokens of reasoning and answer per question.")
    limit: int | None = Field(default=None, ge=1, description="At most this many questions per subject.")
    save_dir: str = Field(
        default="uploads",
        description="Folder of the result files in the job's files ('uploads', the default, is the top; "
        "'uploads/mmlu' puts them under mmlu/), as OpenWeights' save_dir.",
    )
    global_record_file: str = Field(
        default="eval_record_collection.csv",
        description="Name of the CSV result file with one row per run: the model, each subject's accuracy and the "
        "overall accuracy (OpenWeights' record of evaluations).",
    )
    gpu_util: float = Field(
        default=0.9, gt=0, le=1, description="Share of GPU memory vLLM may use (gpu_memory_utilization)."
    )

    @field_validator("save_dir", "global_record_file")
    @classmethod
    def _relative(cls, value: str) -> str:
        return check_mount_path(value)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        if ":" in value and not ID_RE.match(value):
            raise ValueError(f"{value!r} is neither a Hub dataset id nor a file id nor a directory")
        return value


def matching_subjects(subjects: Iterable[str], selected: str) -> list[str]:
    """MMLU-Pro's `selected_subjects`: 'all', or the subjects containing any of the comma-separated names (spaces
    and underscores alike)."""
    if selected.strip() == "all":
        return list(subjects)
    wanted = [name.strip().replace(" ", "_") for name in selected.split(",") if name.strip()]
    return [s for s in subjects if any(w in s.replace(" ", "_") for w in wanted)]


def _whole(value: Any) -> int | None:
    """An inspect option's whole number (`limit` may also be a range 'a,b': no count then)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# Questions per subject in MMLU-Pro's test split (TIGER-Lab/MMLU-Pro: 12,032 in all), for the cost estimate.
MMLU_PRO_SUBJECTS = {
    "biology": 717,
    "business": 789,
    "chemistry": 1132,
    "computer science": 410,
    "economics": 844,
    "engineering": 969,
    "health": 818,
    "history": 381,
    "law": 1101,
    "math": 1351,
    "other": 924,
    "philosophy": 499,
    "physics": 1299,
    "psychology": 798,
}
# Tokens of one question with its options, of one chain-of-thought example (question and worked answer), and of a
# typical chain-of-thought answer: rough averages of MMLU-Pro's test and validation rows (~4 characters a token).
MMLU_PRO_QUESTION_TOKENS = 250
MMLU_PRO_SHOT_TOKENS = 450
MMLU_PRO_ANSWER_TOKENS = 400
INSPECT_PROMPT_TOKENS = 1000  # per sample, when the task does not say (its dataset decides)


@register("inspect_ai")
class InspectJob(ServingJob):
    """Serves the model with vLLM inside the run and runs `inspect eval` against it."""

    deployment = "eval/inspect-ai"
    entrypoint = "flows/evals/inspect_eval.py:inspect_eval"
    params = InspectParams
    code = ("flows/evals", "flows/_runtime.py", "flows/_vllm.py")
    id_prefix = "inspectjob"

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """A local task file or directory in `eval_name` is uploaded (content-addressed: an unchanged file is
        the same file id, so the same job) and mounted under its name; so is a local path given in `mounts`."""
        params = upload_local_mounts(cls, super().prepare_params(params, storage), storage)
        name = params.get("eval_name")
        if not isinstance(name, str):
            return params
        path, _, task = name.partition("@")
        local = Path(path).expanduser()
        if not local.exists() or task_file(name) is None and not local.is_dir():
            return params
        target = local.name
        mounts = {**(params.get("mounts") or {}), target: upload_mount(local, storage)}
        eval_name = target if local.is_file() else path.rstrip("/").rsplit("/", 1)[-1]
        return {**params, "mounts": mounts, "eval_name": f"{eval_name}@{task}" if task else eval_name}

    @classmethod
    def work(cls, validated: InspectParams, storage: Any) -> Any:
        """Samples × epochs from `options` (`limit`, `epochs`): the task's dataset decides how many samples there are
        otherwise, and the flow does not load it before the run."""
        from ow_prefect.costs.work import generation, model_work

        work = model_work(validated.base_model, quantized=validated.quantization is not None)
        options = validated.options  # from a command line, numbers are strings
        limit, epochs, max_tokens = (
            _whole(options.get(name, default))
            for name, default in (("limit", None), ("epochs", 1), ("max_tokens", 1024))
        )
        if limit is None or epochs is None:
            work.open_ended = "inspect's task decides how many samples it has: set options={'limit': N} to estimate"
            return work
        samples = limit * epochs
        work.prefill_tokens = samples * INSPECT_PROMPT_TOKENS
        work.decode_tokens = generation(samples, max_tokens or 1024)
        work.notes.append(f"{INSPECT_PROMPT_TOKENS} prompt tokens per sample assumed (the task's own may differ)")
        return work


@register("mmlu_pro")
class MmluProJob(ServingJob):
    """MMLU-Pro with chain-of-thought prompts, generated by vLLM's offline engine."""

    deployment = "eval/mmlu-pro"
    entrypoint = "flows/evals/mmlu_pro.py:mmlu_pro"
    params = MmluProParams
    code = ("flows/evals", "flows/inference", "flows/_runtime.py", "flows/_vllm.py")
    id_prefix = "mmluprojob"

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        params = super().prepare_params(params, storage)
        dataset = params.get("dataset")
        if isinstance(dataset, str) and not ID_RE.match(dataset) and Path(dataset).expanduser().is_dir():
            return {**params, "dataset": storage.put_path(Path(dataset).expanduser(), "dataset").id}
        return params

    @classmethod
    def work(cls, validated: MmluProParams, storage: Any) -> Any:
        """The selected subjects' questions (at most `limit` each), each prompted with `ntrain` chain-of-thought
        examples and answered greedily up to max_tokens. Question counts are the Hub dataset's (a local copy is
        assumed to be the same)."""
        from ow_prefect.costs.work import generation, model_work

        subjects = matching_subjects(MMLU_PRO_SUBJECTS, validated.selected_subjects)
        questions = sum(min(MMLU_PRO_SUBJECTS[s], validated.limit or MMLU_PRO_SUBJECTS[s]) for s in subjects)
        prompt = min(
            validated.max_model_len - validated.max_tokens,
            MMLU_PRO_QUESTION_TOKENS + validated.ntrain * MMLU_PRO_SHOT_TOKENS,
        )
        work = model_work(validated.base_model, quantized=validated.quantization is not None)
        work.prefill_tokens = questions * max(prompt, MMLU_PRO_QUESTION_TOKENS)
        work.decode_tokens = generation(questions, validated.max_tokens, typical=MMLU_PRO_ANSWER_TOKENS)
        work.sequence_tokens = min(validated.max_model_len, prompt + MMLU_PRO_ANSWER_TOKENS)
        return work

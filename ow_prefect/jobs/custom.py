"""Custom jobs: files mounted into a work dir + a shell command, all run by the `custom/run` deployment.

Two ways in, one flow:
- ``ow.custom.create(entrypoint="python job.py", mounts={"job.py": "./job.py"})``: the built-in `custom` type
  (`CommandJob`); a mount is a file id or a local path (uploaded first).
- Your own job type, as in OpenWeights: subclass `CustomJob`, declare ``mount`` (local path -> path in the
  job), ``params`` (a pydantic model), ``requires_vram_gb``, ``base_image`` and ``get_entrypoint``, and
  ``@register("my_job")`` it; ``ow.my_job.create(**params)`` uploads the mounted files and submits.

Either way the client turns the call into the flow's parameters (`CustomRunParams`: the command, the mounted
file ids, the GPU memory, the job type's validated params): uploading is content-addressed, so unchanged files
are not uploaded again and give the same job id, and a changed file gives a new one.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ow_prefect.jobs.base import Job, parameter_error, validate_for
from ow_prefect.storage import ID_RE

MOUNT_PURPOSE = "custom"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Left out when a mounted directory is uploaded: tool caches, environments, version control, and `.env`
# (it usually holds API keys). A file named explicitly in a mount is always uploaded.
MOUNT_SKIP = frozenset(
    {
        ".git",
        ".hg",
        ".venv",
        "venv",
        "__pycache__",
        ".ipynb_checkpoints",
        ".pytest_cache",
        ".ruff_cache",
        ".mypy_cache",
        "node_modules",
        ".DS_Store",
        ".env",
    }
)


def check_mount_path(path: str) -> str:
    """A mount target must stay inside the job's work dir."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise ValueError(
            f"mount target {path!r} escapes the work dir; use a relative path without '..' (e.g. 'data/train.jsonl')"
        )
    return pure.as_posix()


def check_mounts(mounts: dict[str, str]) -> dict[str, str]:
    """Mount targets (normalized, inside the work dir) -> file ids."""
    checked = {}
    for path, file_id in mounts.items():
        if not ID_RE.match(file_id):
            raise ValueError(
                f"mounts[{path!r}]: {file_id!r} is neither a file id nor an existing local file or directory"
            )
        checked[check_mount_path(path)] = file_id
    return checked


def upload_mount(local: Path, storage: Any) -> str:
    """Upload a local file or directory to mount (content-addressed; caches, .git, .venv and .env left out)."""
    return storage.put_path(local, MOUNT_PURPOSE, skip=MOUNT_SKIP).id


class CustomRunParams(BaseModel):
    """Parameters of the `custom/run` flow."""

    model_config = ConfigDict(extra="forbid")

    entrypoint: str = Field(
        min_length=1,
        description="Shell command run in the job's work dir. Files it writes under uploads/ become result files; "
        "JSON it writes to $OW_OUTPUTS is merged into job.outputs.",
    )
    mounts: dict[str, str] = Field(
        default_factory=dict,
        description="Path in the work dir -> file id (a file or a directory) downloaded there before the command "
        "runs ('.' is the work dir itself). The SDK uploads local paths given here first.",
    )
    requires_vram_gb: int = Field(default=0, ge=0, description="GPU memory the job needs (0: runs on CPU).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The job type's validated parameters, written as JSON to the file $OW_PARAMS names.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the command (plain values: they are flow parameters, shown in the "
        "UI; put keys in `secrets`).",
    )
    secrets: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the command whose values come from Prefect Secret blocks: "
        "{variable: block name}, e.g. {'HF_TOKEN': 'hf-token'}. Only the names are parameters. Without this the "
        "command gets no credential of the machine it runs on.",
    )

    @field_validator("mounts")
    @classmethod
    def _check_mounts(cls, mounts: dict[str, str]) -> dict[str, str]:
        return check_mounts(mounts)

    @field_validator("env", "secrets")
    @classmethod
    def _check_names(cls, variables: dict[str, str]) -> dict[str, str]:
        for name in variables:
            if not ENV_NAME_RE.fullmatch(name) or name.startswith("OW_"):
                raise ValueError(
                    f"{name!r} is not a variable the command can be given: use letters, digits and '_' (not "
                    "starting with a digit), and no OW_ prefix (the job's own variables)"
                )
        return variables

    @model_validator(mode="after")
    def _set_once(self) -> CustomRunParams:
        if both := sorted(set(self.env) & set(self.secrets)):
            raise ValueError(f"{both} set in both env and secrets; keep each in one")
        return self


class NoParams(BaseModel):
    """The parameters of a custom job type that takes none."""

    model_config = ConfigDict(extra="forbid")


class CustomJob(Job):
    """Base class of custom job types (not registered itself). Subclass it, as in OpenWeights::

        @register("word_count")
        class WordCount(CustomJob):
            mount = {"count.py": "count.py", "data/": "data"}  # local path -> path in the job's work dir
            params = WordCountParams                            # pydantic; unknown keys are rejected
            requires_vram_gb = 0                                # or a `requires_vram_gb` field in params
            base_image = "ghcr.io/me/ow-train:0.1"              # optional; default OW_TRAIN_IMAGE
            secrets = {"HF_TOKEN": "hf-token"}                  # optional: variable -> Secret block

            def get_entrypoint(self, validated_params: WordCountParams) -> str:
                return f"python count.py --min-length {validated_params.min_length}"

    Relative local paths in ``mount`` are relative to the file that defines the class (the current directory
    when there is none, e.g. in a notebook); directories are uploaded without the names in ``MOUNT_SKIP``.
    The command finds the validated params as JSON in the file ``$OW_PARAMS`` too. It gets no credential of
    the machine it runs on: ``env`` (plain values) and ``secrets`` (values from Secret blocks) give it what it
    needs. The job id covers the command, the mounted files' content, the params, env and the names in
    secrets, the image and the `custom/run` flow's code.
    """

    deployment = "custom/run"
    entrypoint = "flows/custom.py:custom_run"
    code = ("flows/custom.py", "flows/_runtime.py")
    params: ClassVar[type[BaseModel]] = NoParams
    mount: ClassVar[dict[str, str]] = {}
    requires_vram_gb: ClassVar[int] = 0
    env: ClassVar[dict[str, str]] = {}
    secrets: ClassVar[dict[str, str]] = {}

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        raise NotImplementedError(f"{type(self).__name__} must define get_entrypoint(self, validated_params) -> str")

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """Validate the type's own params (before any upload), upload the mounts, build the flow's parameters.
        ``requires_vram_gb`` overrides the type's own, as in OpenWeights, also when its params do not have it."""
        vram_override = None
        if "requires_vram_gb" not in cls.params.model_fields:
            params = dict(params)
            vram_override = params.pop("requires_vram_gb", None)
        validated = validate_for(cls, cls.params, params)
        base = cls._mount_base()
        mounts = {f"mount[{local!r}]": (base / Path(local).expanduser(), target) for local, target in cls.mount.items()}
        _check_mounts(cls, mounts)
        vram = getattr(validated, "requires_vram_gb", vram_override)
        return {
            "entrypoint": cls._command(validated),
            "mounts": {target: upload_mount(local, storage) for local, target in mounts.values()},
            "requires_vram_gb": cls.requires_vram_gb if vram is None else vram,
            "params": validated.model_dump(mode="json"),
            "env": dict(cls.env),
            "secrets": dict(cls.secrets),
        }

    @classmethod
    def validate_params(cls, **kwargs: Any) -> CustomRunParams:
        """Validate the flow's parameters (what `prepare_params` built)."""
        return validate_for(cls, CustomRunParams, kwargs)

    @classmethod
    def job_variables(cls, validated: CustomRunParams) -> dict[str, Any]:
        return {"min_vram_gb": validated.requires_vram_gb}

    @classmethod
    def work(cls, validated: CustomRunParams, storage: Any) -> Any:
        from ow_prefect.costs.work import Work

        return Work(open_ended="a custom command runs as long as it runs (cap it with max_runtime or max_cost)")

    @classmethod
    def for_type(cls, name: str, id_prefix: str) -> type[CustomJob]:
        """This type under another name and id prefix: how `custom/run` identifies a run of a job type defined
        only in the client's code (what runs is all in the parameters, so the class itself is not needed)."""
        return type(cls.__name__, (cls,), {"name": name, "id_prefix": id_prefix})

    @classmethod
    def _command(cls, validated: BaseModel) -> str:
        # OpenWeights declares get_entrypoint as an instance method; there is no job yet, a bare instance serves.
        command = object.__new__(cls).get_entrypoint(validated)
        if not isinstance(command, str) or not command.strip():
            raise parameter_error(cls, [f"get_entrypoint returned {command!r}; return the shell command to run"])
        return command

    @classmethod
    def _mount_base(cls) -> Path:
        defined_in = getattr(sys.modules.get(cls.__module__), "__file__", None)
        return Path(defined_in).resolve().parent if defined_in else Path.cwd()


def _check_mounts(job_cls: type[Job], mounts: dict[str, tuple[Path, str]]) -> None:
    """Every local path exists and every target stays in the work dir (`label -> (local, target)`); checked
    before anything is uploaded, every problem listed."""
    problems = []
    for label, (local, target) in mounts.items():
        if not local.exists():
            problems.append(f"{label}: {str(local)!r} does not exist")
        try:
            check_mount_path(target)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
    if problems:
        raise parameter_error(job_cls, problems)


def _is_local(source: Any) -> bool:
    return isinstance(source, os.PathLike) or isinstance(source, str) and not ID_RE.match(source)


# registered as `custom` by ow_prefect.jobs.registry (which imports this module, so it cannot be imported here)
class CommandJob(CustomJob):
    """The built-in `custom` type: any command, with mounts given as file ids or local paths."""

    params = CustomRunParams
    id_prefix = "customjob"

    @classmethod
    def prepare_params(cls, params: dict[str, Any], storage: Any) -> dict[str, Any]:
        """Upload the mounts given as local paths; file ids stay as they are."""
        return upload_local_mounts(cls, params, storage)


def upload_local_mounts(job_cls: type[Job], params: dict[str, Any], storage: Any) -> dict[str, Any]:
    """`params` with the `mounts` given as local paths uploaded (file ids stay as they are); every missing path
    or escaping target is named before anything is uploaded."""
    mounts = params.get("mounts")
    if not isinstance(mounts, dict):
        return params
    local = {target: Path(source).expanduser() for target, source in mounts.items() if _is_local(source)}
    _check_mounts(job_cls, {f"mounts[{target!r}]": (path, target) for target, path in local.items()})
    uploaded = {target: upload_mount(path, storage) for target, path in local.items()}
    return {**params, "mounts": {**mounts, **uploaded}}

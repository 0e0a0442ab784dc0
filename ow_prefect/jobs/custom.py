"""The generic custom job: mounted files + a shell command, run by the `custom/run` deployment."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ow_prefect.jobs.base import Job, register
from ow_prefect.storage import ID_RE


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
            raise ValueError(f"mounts[{path!r}]: {file_id!r} is not a file id (upload it with ow.files first)")
        checked[check_mount_path(path)] = file_id
    return checked


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
        description="Path in the work dir -> file id (a file or a directory) downloaded there before the command runs.",
    )
    requires_vram_gb: int = Field(default=0, ge=0, description="GPU memory the job needs (0: runs on CPU).")

    @field_validator("mounts")
    @classmethod
    def _check_mounts(cls, mounts: dict[str, str]) -> dict[str, str]:
        return check_mounts(mounts)


@register("custom")
class CustomJob(Job):
    """Runs `entrypoint` with `mounts` in a fresh work dir; the base of user-defined custom jobs."""

    deployment = "custom/run"
    entrypoint = "flows/custom.py:custom_run"
    params = CustomRunParams
    code = ("flows/custom.py", "flows/_runtime.py")
    id_prefix = "customjob"

    @classmethod
    def job_variables(cls, validated: CustomRunParams) -> dict[str, Any]:
        return {"min_vram_gb": validated.requires_vram_gb}

"""`OWSettings`: every ``OW_*`` setting, read from the environment or a ``.env`` file in the working directory.

The one table of them is docs/reference.md ("Settings"), generated from the fields below
(`python -m ow_prefect.reference`): a new setting is a field here, with its description, and nowhere else.

`get_settings()` reads them once per process: the ``.env`` file is read again only when the process's own
``OW_*`` environment or working directory changed since (tests and notebooks that set a variable see it at
once), or after `refresh_settings()` — for a long-running process that must see an edited ``.env``.

Not settings: the variables a custom job's command receives from its flow run (``OW_JOB_ID``,
``OW_FLOW_RUN_ID``, ``OW_WORK_DIR``, ``OW_PARAMS``, ``OW_OUTPUTS``, ``OW_RUN_LOG``; see `ow_prefect.run_log`):
they describe one run, are set by the flow for its child process only, and must never come from a ``.env``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OWSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OW_", env_file=".env", extra="ignore", frozen=True)

    home: Path = Field(default=Path("~/.ow_prefect"), description="Where local state lives.")
    storage_block: str | None = Field(
        default=None, description="Slug of a saved Prefect filesystem block, e.g. 's3-bucket/ow-storage'."
    )
    storage_dir: Path | None = Field(default=None, description="Local storage directory (no block set).")
    storage_retry_seconds: float = Field(
        default=300,
        ge=0,
        description="About how long S3 calls keep retrying while the store is unreachable or failing (botocore's "
        "retries get as many attempts as make this much back-off).",
    )
    max_file_mb: float = Field(default=2048, gt=0, description="Largest file ow.files accepts, in MiB.")
    vllm_python: Path | None = Field(default=None, description="Interpreter of the vLLM environment.")
    vllm_optimization_level: int | None = Field(
        default=None,
        ge=0,
        le=3,
        description="vLLM's --optimization-level for the engines the flows start (unset: vLLM's default, which "
        "compiles the model at each start; 0: no compiling, faster starts, slower decoding of big models).",
    )
    mode: Literal["auto", "server", "embedded"] = Field(default="auto", description="How jobs are run.")
    train_image: str = Field(default="ow-prefect-train:0.1", description="Image of training and custom jobs.")
    serve_image: str = Field(default="ow-prefect-serve:0.1", description="Image of vLLM jobs.")
    deployment_suffix: str = Field(
        default="", description="Appended to built-in deployment names ('-local': the local variants)."
    )
    chat_cache_dir: Path | None = Field(default=None, description="The chat client's disk cache directory.")
    chat_cache_gb: float = Field(default=10.0, gt=0, description="Size limit of the chat cache, in GiB.")
    openai_batch_poll_seconds: float = Field(
        default=30.0, gt=0, description="Batch inference: how often OpenAI's Batch API is polled."
    )
    runpod_poll_seconds: float = Field(default=2.0, gt=0, description="RunPod worker: run and pod poll interval.")
    runpod_reconcile_seconds: float = Field(default=60.0, gt=0, description="RunPod worker: orphan sweep interval.")
    pod_code_dir: str | None = Field(
        default=None,
        description="Where RunPod pods find the project's code (set on the worker, passed to its pods); default "
        "the image's copy, /opt/ow_prefect. A checkout the pods see: a network volume, or this one for FakeRunPod.",
    )
    openai_key_secret: str = Field(
        default="openai-api-key",
        description="Prefect Secret block with the OpenAI key, used when OPENAI_API_KEY is not set.",
    )
    openai_concurrency: int = Field(default=64, gt=0, description="Chat client: requests in flight to OpenAI.")
    hf_token_secret: str = Field(
        default="hf-token", description="Prefect Secret block with the team's Hugging Face token (runs read it)."
    )
    hf_org: str | None = Field(
        default=None,
        description="Hub organization that fills {org} in finetuned_model_id (else HF_ORG / HF_USER where the job "
        "is created, else the token's user).",
    )
    train_backend: Literal["auto", "unsloth", "transformers"] = Field(
        default="auto", description="How training loads the model: unsloth where installed (auto), or forced."
    )
    api_heartbeat_seconds: float = Field(
        default=2.0, gt=0, description="Temporary API run: how often it checks its keep-alive deadline."
    )
    api_startup_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="Temporary API run: how long vLLM may take to become healthy."
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def local_storage_dir(self) -> Path:
        return (self.storage_dir or self.home_dir / "storage").expanduser()

    @property
    def vllm_interpreter(self) -> Path:
        return (self.vllm_python or self.home_dir / "envs" / "vllm" / "bin" / "python").expanduser()

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    def exported(self, names: Iterable[str]) -> dict[str, str]:
        """The settings among `names` (``OW_...``) that were set (environment or ``.env``), as environment
        variables for another process."""
        fields = {name: name.removeprefix("OW_").lower() for name in names}
        return {name: str(getattr(self, field)) for name, field in fields.items() if field in self.model_fields_set}


@functools.lru_cache(maxsize=4)
def _read(working_directory: str, environment: tuple[tuple[str, str], ...]) -> OWSettings:
    return OWSettings()


def get_settings() -> OWSettings:
    """The settings of this process, read once (see the module docstring); the same object until the ``OW_*``
    environment or the working directory changes."""
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k[:3].upper() == "OW_"))
    try:
        working_directory = os.getcwd()
    except FileNotFoundError:  # it was removed under us: no .env there either
        working_directory = ""
    return _read(working_directory, environment)


def refresh_settings() -> OWSettings:
    """Read the settings (and ``.env``) again."""
    _read.cache_clear()
    return get_settings()

"""Settings read from the environment (prefix ``OW_``) or a ``.env`` file in the working directory.

- ``OW_HOME``: where local state lives (storage, the vLLM environment); default ``~/.ow_prefect``.
- ``OW_STORAGE_BLOCK``: slug of a saved Prefect filesystem block, e.g. ``s3-bucket/ow-storage``; default: local
  disk at ``OW_STORAGE_DIR`` (default ``OW_HOME/storage``).
- ``OW_STORAGE_RETRY_SECONDS``: how long storage calls retry while S3 is unreachable or failing (default 300).
- ``OW_MAX_FILE_MB``: largest file ``ow.files`` accepts (default 2048).
- ``OW_VLLM_PYTHON``: interpreter of the separate vLLM environment; default ``OW_HOME/envs/vllm/bin/python``.
- ``OW_MODE``: ``auto`` (server when a Prefect API URL is set, else embedded), ``server`` or ``embedded``.
- ``OW_TRAIN_IMAGE`` / ``OW_SERVE_IMAGE``: images of training/custom and vLLM jobs (part of every job id).
- ``OW_DEPLOYMENT_SUFFIX``: appended to every built-in deployment's name when the SDK submits, e.g. ``-local``
  for prefect.yaml's local variants (``finetune/sft-local`` on the ``local`` process pool); default none.
- ``OW_CHAT_CACHE_DIR`` / ``OW_CHAT_CACHE_GB``: the chat client's disk cache (default ``OW_HOME/chat-cache``, 10).
- ``OW_OPENAI_BATCH_POLL_SECONDS``: how often batch inference asks OpenAI how its batches are doing (default 30).
- ``OW_RUNPOD_POLL_SECONDS``: how often the RunPod worker looks at each run and its pod (default 2).
- ``OW_RUNPOD_RECONCILE_SECONDS``: how often the RunPod worker looks for orphaned pods (default 60).
- ``OW_POD_CODE_DIR``: where RunPod pods find the project's code; default the image's copy (``/opt/ow_prefect``).
  Set on the RunPod worker, which passes it to its pods (``ow_prefect.workers.pull``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OWSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OW_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path("~/.ow_prefect"), description="Where local state lives.")
    storage_block: str | None = Field(
        default=None, description="Slug of a saved Prefect filesystem block, e.g. 's3-bucket/ow-storage'."
    )
    storage_dir: Path | None = Field(default=None, description="Local storage directory (no block set).")
    storage_retry_seconds: float = Field(
        default=300, ge=0, description="How long storage calls keep retrying while S3 is unreachable or failing."
    )
    max_file_mb: float = Field(default=2048, gt=0, description="Largest file ow.files accepts, in MiB.")
    vllm_python: Path | None = Field(default=None, description="Interpreter of the vLLM environment.")
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


def get_settings() -> OWSettings:
    """Fresh settings on every call, so a changed environment (tests, notebooks) is always seen."""
    return OWSettings()

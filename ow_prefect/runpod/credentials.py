"""`RunPodCredentials`: the Prefect block that holds a RunPod API key (and, for the fake or a proxy, the URL).

    from ow_prefect.runpod.credentials import RunPodCredentials
    RunPodCredentials(api_key="rpa_...").save("runpod")          # then pick "runpod" in the work pool form

The key is a `SecretStr`: Prefect stores it encrypted and never shows it in the UI, a log or a repr.
Without a block, the worker and `dev-pod` fall back to `RUNPOD_API_KEY` (and `RUNPOD_API_URL`) in their own
environment.
"""

from __future__ import annotations

import os

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from ow_prefect.errors import ConfigurationError
from ow_prefect.runpod.client import DEFAULT_BASE_URL, AsyncRunPodClient


class RunPodCredentials(Block):
    """A RunPod API key for the `runpod` work pool's worker."""

    _block_type_name = "RunPod Credentials"
    _block_type_slug = "runpod-credentials"
    _description = "A RunPod API key (REST v2), used by ow_prefect's `runpod` worker to create and delete pods."
    _documentation_url = "https://docs.runpod.io/get-started/api-keys"

    api_key: SecretStr = Field(
        title="API key", description="A RunPod API key with read/write access to pods (Settings → API Keys)."
    )
    api_url: str = Field(
        default=DEFAULT_BASE_URL,
        title="API URL",
        description="RunPod's REST v2 base URL; change it only for a proxy or ow_prefect's local fake.",
    )

    def get_client(self, **options: object) -> AsyncRunPodClient:
        return AsyncRunPodClient(self.api_key.get_secret_value(), base_url=self.api_url, **options)

    @classmethod
    def from_env(cls) -> RunPodCredentials:
        """`RUNPOD_API_KEY` (and optionally `RUNPOD_API_URL`) of this process."""
        key = os.environ.get("RUNPOD_API_KEY")
        if not key:
            raise ConfigurationError(
                "no RunPod credentials: set the work pool's `credentials` variable to a RunPod Credentials block "
                "(`RunPodCredentials(api_key=...).save('runpod')`), or set RUNPOD_API_KEY in the environment of the "
                "worker (or of this command)"
            )
        return cls(api_key=key, api_url=os.environ.get("RUNPOD_API_URL") or DEFAULT_BASE_URL)

"""Where a chat request goes: OpenAI, a `TemporaryApi` live in this process, or a server deployed on demand;
and the identity of the weights that answer it (part of every cache key)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ow_prefect.openai_names import OPENAI_PREFIX, is_openai

OPENAI_URL = "https://api.openai.com/v1"

# Live TemporaryApi objects of this process, by the model names they serve (TemporaryApi registers itself).
LIVE_APIS: dict[str, Any] = {}


@dataclass(frozen=True)
class Endpoint:
    """One server and the name to ask it for: `key` (base URL + API key) identifies its connection pool."""

    base_url: str
    api_key: str
    model: str
    concurrency: int

    @property
    def key(self) -> tuple[str, str]:
        return self.base_url, self.api_key


def openai_endpoint(model: str) -> Endpoint:
    """OpenAI (or `OPENAI_BASE_URL`): the key from OPENAI_API_KEY, else the Secret block named by
    OW_OPENAI_KEY_SECRET (default `openai-api-key`)."""
    from ow_prefect.errors import ConfigurationError, OWError
    from ow_prefect.settings import get_settings

    settings = get_settings()
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        secret = settings.openai_key_secret
        from prefect.blocks.system import Secret

        try:
            key = Secret.load(secret, _sync=True).get()
        except ValueError:  # what Block.load raises when there is no block of that name
            raise ConfigurationError(
                f"model {model!r} goes to OpenAI, but there is no key: set OPENAI_API_KEY or save a Prefect "
                f"Secret block {secret!r}"
            ) from None
        except Exception as exc:
            raise OWError(
                f"model {model!r} goes to OpenAI and OPENAI_API_KEY is not set, but reading the Secret block "
                f"{secret!r} failed ({type(exc).__name__}: {exc}); check that the Prefect API is reachable"
            ) from exc
    return Endpoint(
        base_url=os.environ.get("OPENAI_BASE_URL", OPENAI_URL),
        api_key=key,
        model=model.removeprefix(OPENAI_PREFIX),
        concurrency=settings.openai_concurrency,
    )


def weights_identity(model: str | dict[str, Any]) -> str:
    """What answers a request for `model`, independent of which server does: OpenAI's model name, or the base
    model plus the content-addressed adapter id (a fine-tuning job id is resolved to both)."""
    if isinstance(model, str) and is_openai(model):
        return json.dumps({"openai": model.removeprefix(OPENAI_PREFIX), "url": os.environ.get("OPENAI_BASE_URL")})
    from ow_prefect.jobs.api import adapter_name
    from ow_prefect.jobs.inference import ModelRef, resolve_model

    ref = resolve_model(model)
    if isinstance(ref, dict):
        ref = ModelRef.model_validate(ref)
    if isinstance(ref, ModelRef):
        return json.dumps({"base": ref.base, "adapter": ref.adapter}, sort_keys=True)
    live = LIVE_APIS.get(ref)
    if live is not None:  # a served adapter name of a live API (e.g. "adapter-dir-…")
        for adapter in live.validated.adapters:
            if adapter_name(adapter) == ref:
                return json.dumps({"base": adapter.base, "adapter": adapter.adapter}, sort_keys=True)
    return json.dumps({"base": ref, "adapter": None}, sort_keys=True)

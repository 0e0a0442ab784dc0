"""The chat cache: seeded requests only, keyed by the whole request and the weights that answer it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

UNCACHED_KEYS = {"stream", "stream_options", "timeout", "extra_headers"}


def cache_key(request: dict[str, Any], identity: str) -> str | None:
    """None unless the request has a `seed` (an unseeded sample must not be replayed) and does not stream."""
    if request.get("seed") is None or request.get("stream"):
        return None
    body = {k: v for k, v in request.items() if k not in UNCACHED_KEYS}
    canonical = json.dumps({"request": body, "weights": identity}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ChatCache:
    """diskcache under `directory`, at most `size_gb`; a corrupt or unreadable entry is a miss."""

    def __init__(self, directory: Path, size_gb: float = 10.0):
        import diskcache

        self._cache = diskcache.Cache(str(directory), size_limit=int(size_gb * 1024**3))

    def get(self, key: str) -> Any:
        from openai.types.chat import ChatCompletion

        try:
            value = self._cache.get(key)
            return ChatCompletion.model_validate_json(value) if value is not None else None
        except Exception:  # a corrupt entry: ignore it, the request is made again
            return None

    def set(self, key: str, completion: Any) -> None:
        with contextlib.suppress(Exception):  # a full or read-only disk must not fail the request
            self._cache.set(key, completion.model_dump_json())

    def close(self) -> None:
        self._cache.close()

"""`ow.chat.completions`: openai-python's chat API over base models, fine-tuned adapters and OpenAI models.

    reply = ow.chat.completions.create(model="ftjob-…", messages=[...], max_tokens=100, seed=0)
    replies = ow.chat.completions.batch([{"model": ..., "messages": [...]}, ...])   # in input order

Returns openai's own types. OpenAI models (`gpt-…`, `o3…`, or `openai/<name>`) go to OpenAI; a model served by
a `TemporaryApi` that is up in this process goes to it; any other model is deployed on demand (see
`engine.py` for grouping, concurrency and retries). Seeded requests are cached on disk.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ow_prefect.chat.cache import ChatCache
from ow_prefect.chat.engine import ChatEngine, ChatFailure, ChatSettings

__all__ = ["AsyncChat", "Chat", "ChatFailure", "ChatSettings"]


def _engine(ow: Any) -> ChatEngine:
    settings = ow.settings
    directory = settings.chat_cache_dir or settings.home_dir / "chat-cache"
    return ChatEngine(ow, ChatCache(Path(directory).expanduser(), settings.chat_cache_gb))


def _requests(source: Iterable[dict[str, Any]] | str | Path) -> Iterable[dict[str, Any]]:
    """A list or iterator of request dicts, or a JSONL file of them (read lazily)."""
    if isinstance(source, str | Path):
        return _jsonl(Path(source))
    return source


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


class _BackgroundLoop:
    """The sync face's event loop, in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="ow-chat", daemon=True).start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


class Completions:
    def __init__(self, chat: Chat):
        self._chat = chat

    def create(self, **request: Any) -> Any:
        """Like `openai.OpenAI().chat.completions.create`; returns a `ChatCompletion` (or a `Stream` with
        ``stream=True``, passed through without cache or retries once it started)."""
        if request.get("stream"):
            import openai

            endpoint = self._chat._loop.run(self._chat.engine._endpoint(request["model"]))
            client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=2)
            return client.chat.completions.create(**{**request, "model": endpoint.model})
        return self._chat._loop.run(self._chat.engine.create(**request))

    def batch(
        self,
        requests: Iterable[dict[str, Any]] | str | Path,
        progress: bool = True,
        on_result: Callable[[int, Any], Any] | None = None,
    ) -> list[Any] | int:
        """Every request (a list, an iterator or a JSONL file), answers in input order; a failure is a
        `ChatFailure` in its place, the others unaffected. `on_result(index, answer)` receives answers as they
        come instead of a list (for inputs too big to keep every answer; called on the chat thread)."""
        return self._chat._loop.run(self._chat.engine.batch(_requests(requests), progress, on_result))


class Chat:
    """``ow.chat`` of the sync client."""

    def __init__(self, ow: Any):
        self.engine = _engine(ow)
        self.settings: ChatSettings = self.engine.settings
        self._loop = _BackgroundLoop()
        self.completions = Completions(self)

    def close(self, down: bool = True) -> None:
        """Close connections and (`down`) stop the APIs deployed on demand."""
        self._loop.run(self.engine.aclose(down=down))


class AsyncCompletions:
    def __init__(self, chat: AsyncChat):
        self._chat = chat

    async def create(self, **request: Any) -> Any:
        """Like `openai.AsyncOpenAI().chat.completions.create` (an `AsyncStream` with ``stream=True``)."""
        return await self._chat.engine.create(**request)

    async def batch(
        self,
        requests: Iterable[dict[str, Any]] | str | Path,
        progress: bool = True,
        on_result: Callable[[int, Any], Any] | None = None,
    ) -> list[Any] | int:
        return await self._chat.engine.batch(_requests(requests), progress, on_result)


class AsyncChat:
    """``ow.chat`` of the async client."""

    def __init__(self, ow: Any):
        self.engine = _engine(ow)
        self.settings: ChatSettings = self.engine.settings
        self.completions = AsyncCompletions(self)

    async def aclose(self, down: bool = True) -> None:
        await self.engine.aclose(down=down)

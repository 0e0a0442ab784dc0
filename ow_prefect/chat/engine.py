"""The chat engine: cache, routing, deploy-on-demand, per-endpoint concurrency, retries, batches.

One engine per `OpenWeights` client, shared by its sync and async faces (the sync face runs the engine on a
background event loop). What it guarantees:
- a seeded request that was answered before is answered from disk: no network, no semaphore;
- at most `concurrency` requests in flight per endpoint (a vLLM server's `max_num_seqs`), each attempt
  holding a slot only while it talks to the server (not while it waits to retry);
- 429, 5xx, timeouts and dropped connections are retried (`ow_prefect.retry`: exponential back-off with full
  jitter, `Retry-After` honoured up to two minutes); anything else (400, 401, 404) is raised at once;
- a timeout that grows with `max_tokens`;
- a model with no server is deployed on demand: requests that arrive within `deploy_window` seconds are
  grouped, so adapters of one base model share one server; a failed deployment fails its requests with the
  reason instead of leaving them waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ow_prefect.chat.cache import ChatCache, cache_key
from ow_prefect.chat.routing import LIVE_APIS, Endpoint, openai_endpoint, weights_identity
from ow_prefect.errors import OWError
from ow_prefect.openai_names import is_openai
from ow_prefect.retry import RetryRules, retry_after_seconds

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class ChatSettings:
    """How the engine behaves; every field can be changed on `ow.chat.settings`."""

    max_attempts: int = 8
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    base_timeout_s: float = 60.0
    timeout_per_token_s: float = 0.1  # a request may take base + max_tokens × this
    deploy_window_s: float = 2.0
    deploy_kwargs: dict[str, Any] = field(default_factory=dict)
    max_in_flight: int = 1024  # batch(): requests read ahead of the answers (bounds memory, not concurrency)


class ChatFailure(OWError):
    """One request of a batch that failed after its retries; `index` is its place in the input."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(f"request {index}: {type(error).__name__}: {error}")
        self.index = index
        self.error = error


class ChatEngine:
    def __init__(self, ow: Any, cache: ChatCache | None, settings: ChatSettings | None = None):
        self._ow = ow
        self.cache = cache
        self.settings = settings or ChatSettings()
        self._identities: dict[str, str] = {}
        self._clients: dict[tuple[str, str], Any] = {}
        self._semaphores: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._deploying: dict[str, asyncio.Future] = {}  # model -> future endpoint
        self._groups: dict[str, list[tuple]] = {}  # base -> (name, ref, served name, future) waiting for the window
        self._deployed: list[Any] = []  # TemporaryApi objects this engine started
        self._flushes: set[asyncio.Task] = set()  # deploy windows open now (each deploys its base when it closes)
        self._answering: dict[str, asyncio.Future] = {}  # cache key -> the one request answering it now

    # ---- one request -----------------------------------------------------------------------------

    async def create(self, **request: Any) -> Any:
        model = request.get("model")
        if not model or "messages" not in request:
            raise TypeError("create() needs model= and messages=")
        if self.cache is None or request.get("seed") is None or request.get("stream"):
            return await self._send(await self._endpoint(model), request)
        key = cache_key(request, await self._identity(model))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if key in self._answering:  # the same seeded request is on its way: pay for it once
            return await asyncio.shield(self._answering[key])
        future = asyncio.get_running_loop().create_future()
        self._answering[key] = future
        try:
            response = await self._send(await self._endpoint(model), request)
        except Exception as error:
            future.set_exception(error)
            future.exception()  # retrieved here, so a future nobody else awaited does not warn
            raise
        else:
            self.cache.set(key, response)
            future.set_result(response)
            return response
        finally:
            self._answering.pop(key, None)
            if not future.done():  # cancelled or interrupted: whoever waits for the same answer stops too
                future.cancel()

    async def _identity(self, model: Any) -> str:
        name = model if isinstance(model, str) else repr(model)
        if name not in self._identities:
            self._identities[name] = await asyncio.to_thread(weights_identity, model)
        return self._identities[name]

    async def _send(self, endpoint: Endpoint, request: dict[str, Any]) -> Any:
        client = self._client(endpoint)
        semaphore = self._semaphores[endpoint.key]
        body = {**request, "model": endpoint.model}
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 1024
        body.setdefault("timeout", self.settings.base_timeout_s + max_tokens * self.settings.timeout_per_token_s)

        async def attempt() -> Any:
            async with semaphore:  # a slot only while talking to the server, not while waiting to retry
                return await client.chat.completions.create(**body)

        return await self._retry_rules(stream=bool(body.get("stream"))).acall(attempt)

    def _retry_rules(self, stream: bool) -> RetryRules:
        """A chat completion changes nothing on the server, so asking again is safe: it is retried on answers
        that may pass (429 after its `Retry-After`, 5xx, timeouts, dropped connections); a stream never is
        (part of it may have reached the caller)."""
        return RetryRules(
            retry_on=_retryable,
            attempts=1 if stream else self.settings.max_attempts,
            initial_s=self.settings.backoff_s,
            max_s=self.settings.max_backoff_s,
            retry_after=_retry_after,
        )

    def _client(self, endpoint: Endpoint) -> Any:
        if endpoint.key not in self._clients:
            import openai

            self._clients[endpoint.key] = openai.AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=endpoint.api_key,
                max_retries=0,  # retries are ours: back-off with jitter, Retry-After, a slot only while sending
                http_client=_http_client(endpoint.concurrency),
            )
            self._semaphores[endpoint.key] = asyncio.Semaphore(endpoint.concurrency)
        return self._clients[endpoint.key]

    # ---- routing and deploy-on-demand --------------------------------------------------------------

    async def _endpoint(self, model: Any) -> Endpoint:
        name = model if isinstance(model, str) else repr(model)
        if name in self._endpoints:
            return self._endpoints[name]
        if isinstance(model, str) and is_openai(model):
            endpoint = await asyncio.to_thread(openai_endpoint, model)
        elif isinstance(model, str) and model in LIVE_APIS and LIVE_APIS[model].base_url:
            endpoint = _api_endpoint(LIVE_APIS[model], model)
        else:
            endpoint = await self._deploy(model, name)
        self._endpoints[name] = endpoint
        return endpoint

    async def _deploy(self, model: Any, name: str) -> Endpoint:
        if name not in self._deploying:
            from ow_prefect.jobs.adapters import adapter_reference
            from ow_prefect.jobs.api import adapter_name
            from ow_prefect.jobs.inference import ModelRef, resolve_model

            # a Hugging Face LoRA adapter is served under its own name, on the base its config names
            ref = await asyncio.to_thread(lambda: resolve_model(adapter_reference(model, self._ow.storage)))
            ref = ModelRef.model_validate(ref) if isinstance(ref, dict) else ModelRef(base=ref)
            served = adapter_name(ref) if ref.adapter else ref.base
            future = asyncio.get_running_loop().create_future()
            self._deploying[name] = future
            group = self._groups.setdefault(ref.base, [])
            group.append((name, ref, served, future))
            if len(group) == 1:  # the first of its base: it deploys them all when the window closes
                task = asyncio.create_task(self._flush(ref.base, group), name=f"ow-chat-deploy-{ref.base}")
                self._flushes.add(task)
                task.add_done_callback(self._flushes.discard)
        return await asyncio.shield(self._deploying[name])

    async def _flush(self, base: str, group: list[tuple]) -> None:
        """When the window closes, deploy `base` with the adapters of `group` (which grew meanwhile). Every
        request waiting for it gets the endpoint or the reason it failed, also when `aclose` cancels this."""
        try:
            await asyncio.sleep(self.settings.deploy_window_s)
            self._groups.pop(base, None)
            adapters = [ref.model_dump(exclude_none=True) for _, ref, _, _ in group if ref.adapter]
            # deploy() submits the job, up() waits until it serves: blocking calls, kept off the event loop
            api = await asyncio.to_thread(self._ow.api.deploy, base, adapters, **self.settings.deploy_kwargs)
            await asyncio.to_thread(api.up)
            self._deployed.append(api)
        except asyncio.CancelledError:
            self._fail(base, group, OWError(f"deploying {base} was stopped: the chat client was closed"))
            raise
        except Exception as error:  # every waiting request learns why, instead of waiting forever
            self._fail(base, group, OWError(f"deploying {base} failed: {type(error).__name__}: {error}"))
            return
        for _, _, served, future in group:
            if not future.done():
                future.set_result(_api_endpoint(api, served))

    def _fail(self, base: str, group: list[tuple], error: OWError) -> None:
        if self._groups.get(base) is group:
            del self._groups[base]
        for name, _, _, future in group:
            self._deploying.pop(name, None)  # the next request for it tries again
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a request that stopped waiting leaves no warning behind

    # ---- batches ---------------------------------------------------------------------------------

    async def batch(
        self,
        requests: Iterable[dict[str, Any]],
        progress: bool = True,
        on_result: Callable[[int, Any], Any] | None = None,
    ) -> list[Any] | int:
        """Answers in input order; a failed request becomes a `ChatFailure` in its place. At most
        `settings.max_in_flight` requests are read ahead, so a huge iterator is never held in memory at once.
        With `on_result(index, answer)`, answers go there as they come instead (memory stays flat however many
        there are) and the number of requests is returned."""
        results: dict[int, Any] = {}
        tasks: set[asyncio.Task] = set()
        read_ahead = asyncio.Semaphore(self.settings.max_in_flight)  # O(1) per request, however many
        bar = _progress(progress)
        total = 0

        async def one(index: int, request: dict[str, Any]) -> None:
            try:
                answer = await self.create(**request)
            except Exception as error:
                answer = ChatFailure(index, error)
            finally:
                read_ahead.release()
            if on_result is None:
                results[index] = answer
            else:
                on_result(index, answer)
            bar.update(1)

        for index, request in enumerate(requests):
            total = index + 1
            bar.total = max(bar.total or 0, total)
            await read_ahead.acquire()
            task = asyncio.create_task(one(index, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
        bar.close()
        return total if on_result is not None else [results[i] for i in range(total)]

    async def aclose(self, down: bool = True) -> None:
        for task in list(self._flushes):  # deploy windows still open: their requests are told why they end
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if down:
            for api in self._deployed:
                await asyncio.to_thread(api.down)  # returns once its run has ended (seconds)
            self._deployed.clear()


def _retryable(error: BaseException) -> bool:
    import openai

    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUS
    return isinstance(error, openai.APIConnectionError)  # timeouts included (APITimeoutError is one)


def _retry_after(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    return retry_after_seconds(response.headers.get("retry-after")) if response is not None else None


def _api_endpoint(api: Any, model: str) -> Endpoint:
    return Endpoint(api.base_url, api.api_key, model, api.validated.max_num_seqs)


class _NoBar:
    total: int | None = 0

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=0, unit="req", desc="chat", mininterval=0.5)


def _http_client(connections: int) -> Any:
    """openai's own async HTTP client (httpx2 in openai 3.x, whose connection pool stays fast with many
    connections; plain httpx's spends O(connections) per request looking for an idle one) with `connections`
    connections, and no client-side timeout (each request carries its own)."""
    import openai

    client_class = getattr(openai, "DefaultAsyncHttpx2Client", None)
    if client_class is None:  # an openai without httpx2
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(limits=limits, timeout=None)
    import httpx2

    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    return client_class(limits=limits, timeout=None)

"""`OpenWeights` / `AsyncOpenWeights`: one object per Prefect API and storage, resources hung off it."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ow_prefect.client._loop import running_sdk_loop
from ow_prefect.client.api import Api
from ow_prefect.client.files import AsyncFiles, Files
from ow_prefect.client.jobs import AsyncJobs, Jobs, JobTypeResource
from ow_prefect.client.runs import AsyncEvents, AsyncRuns, Events, Runs
from ow_prefect.errors import ConfigurationError, PrefectUnavailableError
from ow_prefect.jobs.registry import get_job_type
from ow_prefect.settings import OWSettings, get_settings
from ow_prefect.storage import Storage

if TYPE_CHECKING:
    from ow_prefect.chat import AsyncChat, Chat
    from ow_prefect.run_log import CurrentRun


class BaseOpenWeights:
    def __init__(
        self,
        *,
        settings: OWSettings | None = None,
        storage: Storage | None = None,
        deploy_kwargs: dict[str, Any] | None = None,
        auth_token: str | None = None,
        organization_id: str | None = None,
        **supabase: Any,
    ):
        from prefect.context import SettingsContext

        _refuse_openweights_auth(auth_token, organization_id, supabase)
        self.settings = settings or get_settings()
        self._storage = storage
        self.deploy_kwargs = dict(deploy_kwargs or {})  # what ow.chat deploys models with (OpenWeights' name)
        # Prefect's settings live in a context variable, which new threads (and anyio worker threads) do
        # not inherit: keep the ones in force now and re-enter them around every call into Prefect.
        self._prefect_settings = SettingsContext.get()
        self._local = threading.local()
        self._open_clients: list[Any] = []
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        # A client dropped without close() lets its connections on the SDK's loop go when it is collected.
        weakref.finalize(self, _close_on_sdk_loop, self._async_clients).atexit = False
        if not self._prefect_settings.settings.api.url:
            # The ephemeral server this process starts would otherwise race its telemetry writes against the
            # job's own on SQLite ("database is locked" tracebacks); a throwaway server has nothing to report.
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            self._prefect_settings = _patient_ephemeral_start(self._prefect_settings)

    @contextmanager
    def prefect_client(self) -> Iterator[Any]:
        """Prefect's sync client, one per thread, kept open: building one costs ~30 ms (TLS context). The SDK's
        resources use `async_prefect_client`; this one is for sync code around them (the CLI)."""
        with prefect_api_errors(self._prefect_api):
            client = getattr(self._local, "client", None)
            if client is None:
                from prefect.client.orchestration import get_client

                with self.prefect_settings():
                    client = get_client(sync_client=True)
                client.__enter__()
                self._local.client = client
                self._open_clients.append(client)
            with client:
                yield client

    @asynccontextmanager
    async def async_prefect_client(self) -> AsyncIterator[Any]:
        """Prefect's async client, one per event loop, kept open until `aclose()` (the sync client's, on the SDK's
        loop thread, until `close()`). Failures to reach Prefect become `PrefectUnavailableError`."""
        loop = asyncio.get_running_loop()
        with prefect_api_errors(self._prefect_api):
            client = self._async_clients.get(loop)
            if client is None:
                # Calls from many threads meet on the SDK's loop: one opens the client, the others wait for it.
                async with self._opening.setdefault(loop, asyncio.Lock()):
                    client = self._async_clients.get(loop)
                    if client is None:
                        from prefect.client.orchestration import get_client

                        with self.prefect_settings():
                            client = get_client()
                        await client.__aenter__()
                        self._async_clients[loop] = client
            async with client:
                yield client

    def _sync_twin(self) -> OpenWeights:
        """This client if it is an `OpenWeights`, else one on the same Prefect API, settings and storage: for
        the synchronous objects a resource hands out (``ow.api``'s `TemporaryApi` and its job) either way."""
        if isinstance(self, OpenWeights):
            return self
        with self.prefect_settings():
            return OpenWeights(settings=self.settings, storage=self._storage)

    @property
    def _prefect_api(self) -> str:
        url = self._prefect_settings.settings.api.url
        return re.sub(r"//[^/@]*@", "//", url) if url else "Prefect's ephemeral API (embedded mode)"

    def close(self) -> None:
        """Close the Prefect clients this client opened in every thread (also done on leaving `with OpenWeights()
        as ow:`). It can still be used: they open again when needed."""
        while self._open_clients:
            self._open_clients.pop().__exit__(None, None, None)
        self._local = threading.local()
        loop = running_sdk_loop()
        if loop is not None and loop in self._async_clients:
            asyncio.run_coroutine_threadsafe(_close_client(self._async_clients, loop), loop).result()

    async def aclose(self) -> None:
        """Close the async Prefect clients of the running event loop and of the SDK's loop thread (also on
        `async with` exit)."""
        await _close_client(self._async_clients, asyncio.get_running_loop())
        loop = running_sdk_loop()
        if loop is not None and loop in self._async_clients:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_close_client(self._async_clients, loop), loop))

    @contextmanager
    def prefect_settings(self) -> Iterator[None]:
        from prefect.context import SettingsContext

        with SettingsContext(profile=self._prefect_settings.profile, settings=self._prefect_settings.settings):
            yield

    @cached_property
    def storage(self) -> Storage:
        return self._storage or Storage.from_settings(self.settings)

    @cached_property
    def embedded(self) -> bool:
        """True when jobs run in this process against Prefect's ephemeral API (no server, no worker)."""
        if self.settings.mode != "auto":
            return self.settings.mode == "embedded"
        return not self._prefect_settings.settings.api.url

    @cached_property
    def api(self) -> Api:
        """Temporary OpenAI-compatible APIs: ``with ow.api.deploy(model) as client: ...``."""
        return Api(self)

    @cached_property
    def run(self) -> CurrentRun:
        """The run of the job this code runs in (inside a job's command): ``ow.run.log({...})``."""
        from ow_prefect.run_log import CurrentRun

        return CurrentRun(self)

    @property
    def hf_org(self) -> str | None:
        """The Hub organization that fills ``{org}`` / ``{org_id}`` in ``finetuned_model_id``: ``OW_HF_ORG``, else
        ``HF_ORG`` or ``HF_USER`` (as OpenWeights reads them); None leaves it to the run (the token's user)."""
        from ow_prefect.jobs.finetune import client_hf_org

        return client_hf_org()

    def __getattr__(self, name: str) -> JobTypeResource:
        if name.startswith("_"):
            raise AttributeError(name)
        resource = JobTypeResource(self.jobs, get_job_type(name))
        self.__dict__[name] = resource
        return resource

    def __repr__(self) -> str:
        mode = "embedded" if self.embedded else "server"
        return f"<{type(self).__name__} mode={mode} storage={self.storage!r}>"


class OpenWeights(BaseOpenWeights):
    """The synchronous SDK.

    >>> ow = OpenWeights()
    >>> file = ow.files.upload("train.jsonl", purpose="conversations")
    >>> job = ow.custom.create(entrypoint="python -c 'print(1)'")
    >>> job.wait().outputs
    """

    def __init__(self, *, use_async: bool = False, **kwargs: Any):
        """`use_async=True` makes ``ow.chat`` the async chat API (``await ow.chat.completions.create(...)``), as
        in OpenWeights; `deploy_kwargs` are what models deployed on demand by ``ow.chat`` get (``max_model_len``,
        ``max_num_seqs``, ...). See `BaseOpenWeights` for the rest."""
        super().__init__(**kwargs)
        self.use_async = use_async

    def __enter__(self) -> OpenWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @cached_property
    def files(self) -> Files:
        return Files(self)

    @cached_property
    def sync_chat(self) -> Chat:
        """openai-python's chat API over base models, adapters and OpenAI: ``ow.chat.completions.create``."""
        from ow_prefect.chat import Chat

        return _with_deploy_kwargs(Chat(self), self.deploy_kwargs)

    @cached_property
    def async_chat(self) -> AsyncChat:
        """The async chat API on this client: ``await ow.async_chat.completions.create(...)``."""
        from ow_prefect.chat import AsyncChat

        return _with_deploy_kwargs(AsyncChat(self), self.deploy_kwargs)

    @property
    def chat(self) -> Chat | AsyncChat:
        """``sync_chat``, or ``async_chat`` when the client was made with ``use_async=True``."""
        return self.async_chat if self.use_async else self.sync_chat

    @cached_property
    def jobs(self) -> Jobs:
        return Jobs(self)

    @cached_property
    def runs(self) -> Runs:
        """The flow runs of jobs: ``ow.runs.list(job_id=...)``."""
        return Runs(self)

    @cached_property
    def events(self) -> Events:
        """What jobs logged and flows reported: ``ow.events.list(job_id=...)``."""
        return Events(self)


class AsyncOpenWeights(BaseOpenWeights):
    """The asynchronous twin: the same resources, awaitable (``await ow.custom.create(...)``)."""

    async def __aenter__(self) -> AsyncOpenWeights:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @cached_property
    def files(self) -> AsyncFiles:
        return AsyncFiles(self)

    @cached_property
    def chat(self) -> AsyncChat:
        """The async chat API: ``await ow.chat.completions.create(...)``."""
        from ow_prefect.chat import AsyncChat

        return _with_deploy_kwargs(AsyncChat(self), self.deploy_kwargs)

    @cached_property
    def jobs(self) -> AsyncJobs:
        return AsyncJobs(self)

    @cached_property
    def runs(self) -> AsyncRuns:
        return AsyncRuns(self)

    @cached_property
    def events(self) -> AsyncEvents:
        return AsyncEvents(self)


async def _close_client(clients: weakref.WeakKeyDictionary, loop: asyncio.AbstractEventLoop) -> None:
    client = clients.pop(loop, None)
    if client is not None:
        await client.__aexit__(None, None, None)


EPHEMERAL_STARTUP_SECONDS = 120


def _patient_ephemeral_start(context: Any) -> Any:
    """Prefect's settings with EPHEMERAL_STARTUP_SECONDS for its ephemeral server to start, unless the user set
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS. The server's start costs ~10 CPU-seconds (mostly imports):
    on 2 busy cores it took longer than Prefect's default 20 s, and an embedded job or `ow` command failed with
    "Timed out while attempting to connect to ephemeral Prefect API server"."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if "startup_timeout_seconds" in context.settings.server.ephemeral.model_fields_set:
        return context
    patient = context.settings.copy_with_update(
        updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_SECONDS}
    )
    return context.model_copy(update={"settings": patient})


def _close_on_sdk_loop(clients: weakref.WeakKeyDictionary) -> None:
    loop = running_sdk_loop()
    if loop is not None and loop in clients and not loop.is_closed():
        asyncio.run_coroutine_threadsafe(_close_client(clients, loop), loop)


@contextmanager
def prefect_api_errors(api: str) -> Iterator[None]:
    """Prefect's transport failures and server errors (5xx) as `PrefectUnavailableError` naming `api`; a 404,
    a 409 or a 422 means something about the request and goes on as Prefect raised it."""
    import httpx

    try:
        yield
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code < 500:
            raise
        raise PrefectUnavailableError(
            f"the Prefect API at {api} failed: {exc.response.status_code} {exc.response.reason_phrase} on "
            f"{exc.request.method} {exc.request.url.path}. A server error, not a missing job or deployment: see "
            "the server's logs, then try again"
        ) from exc
    except httpx.TransportError as exc:
        raise PrefectUnavailableError(
            f"the Prefect API at {api} cannot be reached ({type(exc).__name__}: {exc or 'no answer'}). Start it "
            "(`prefect server start`) or point PREFECT_API_URL at one that runs"
        ) from exc


def _with_deploy_kwargs(chat: Any, deploy_kwargs: dict[str, Any]) -> Any:
    chat.settings.deploy_kwargs = {**deploy_kwargs, **chat.settings.deploy_kwargs}
    return chat


def _refuse_openweights_auth(auth_token: str | None, organization_id: str | None, supabase: dict[str, Any]) -> None:
    """OpenWeights' Supabase credentials have no meaning here: say what takes their place."""
    given = [name for name, value in (("auth_token", auth_token), ("organization_id", organization_id)) if value]
    given += [
        name for name, value in supabase.items() if value is not None and name in ("supabase_url", "supabase_key")
    ]
    unknown = sorted(set(supabase) - {"supabase_url", "supabase_key"})
    if unknown:
        raise TypeError(f"OpenWeights() got unexpected keyword argument(s) {unknown}")
    if given:
        raise ConfigurationError(
            f"OpenWeights({', '.join(given)}=...): ow_prefect has no OpenWeights organization or Supabase. Jobs go "
            "to a Prefect server: set PREFECT_API_URL (and PREFECT_API_KEY for Prefect Cloud) in the environment, "
            "or leave it unset to run jobs in this process; see docs/teams.md. Remove these arguments."
        )

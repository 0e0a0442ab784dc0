"""`OpenWeights` / `AsyncOpenWeights`: one object per Prefect API and storage, resources hung off it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

from ow_prefect.client.files import AsyncFiles, Files
from ow_prefect.client.jobs import AsyncJobs, Jobs, JobTypeResource
from ow_prefect.jobs import custom as _builtin_custom  # noqa: F401  (registers ow.custom)
from ow_prefect.jobs.base import get_job_type
from ow_prefect.settings import OWSettings, get_settings
from ow_prefect.storage import Storage


class BaseOpenWeights:
    def __init__(self, *, settings: OWSettings | None = None, storage: Storage | None = None):
        from prefect.context import SettingsContext

        self.settings = settings or get_settings()
        self._storage = storage
        # Prefect's settings live in a context variable, which new threads (and anyio worker threads) do
        # not inherit: keep the ones in force now and re-enter them around every call into Prefect.
        self._prefect_settings = SettingsContext.get()

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

    @cached_property
    def files(self) -> Files:
        return Files(self)

    @cached_property
    def jobs(self) -> Jobs:
        return Jobs(self)


class AsyncOpenWeights(BaseOpenWeights):
    """The asynchronous twin: the same resources, awaitable (``await ow.custom.create(...)``)."""

    @cached_property
    def files(self) -> AsyncFiles:
        return AsyncFiles(self)

    @cached_property
    def jobs(self) -> AsyncJobs:
        return AsyncJobs(self)

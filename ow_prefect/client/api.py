"""`ow.api`: temporary OpenAI-compatible APIs (vLLM) that live as long as the process using them.

    with ow.api.deploy("Qwen/Qwen2.5-0.5B-Instruct", lora_adapters=[ft_job.id]) as client:   # an openai.OpenAI
        client.chat.completions.create(model=ft_job.id, messages=[...])

`deploy` validates and returns a `TemporaryApi` (nothing runs yet). `up()` (or entering it) submits the
`vllm-api/serve` job — or reuses the one already serving the same thing —, keeps moving its keep-alive
deadline forward from a background thread, waits until vLLM is healthy and returns a client pointed at it
with the key of the run serving it (every run of the API makes its own and deletes it when it ends; joining an
API that is up reads the current one). `down()` (or leaving it) lets the API stop within seconds. If this
process dies, the API stops by itself `keep_alive` seconds after the last extension. See ow_prefect/jobs/api.py
for the channel.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ow_prefect.chat.routing import LIVE_APIS
from ow_prefect.errors import JobFailedError, OWError
from ow_prefect.jobs.adapters import adapter_reference
from ow_prefect.jobs.api import (
    FIRST_DEADLINE_SECONDS,
    ApiJob,
    ApiParams,
    adapter_name,
    deadline_value,
    deadline_variable,
    endpoint_variable,
    key_secret,
)
from ow_prefect.jobs.inference import ModelRef, resolve_model

if TYPE_CHECKING:
    from ow_prefect.client._client import BaseOpenWeights, OpenWeights
    from ow_prefect.jobs.base import Job

DEFAULT_KEEP_ALIVE = 300.0


class TemporaryApi:
    """One vLLM server job. Use as ``with api as client`` (sync) or ``async with api as client`` (async)."""

    def __init__(
        self,
        ow: OpenWeights,
        params: dict[str, Any],
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        first_deadline: float = FIRST_DEADLINE_SECONDS,
        timeout: float = 1800.0,
    ):
        self._ow = ow
        self._params = params
        self.keep_alive = keep_alive
        self.first_deadline = first_deadline
        self.timeout = timeout
        submission = ow.jobs._prepare(ApiJob, params)  # validates now (once: it may read storage), before anything runs
        self.job_id = submission.job_id
        self.validated: ApiParams = submission.validated
        self.base_url: str | None = None
        self.api_key: str | None = None
        self.models: list[str] = list(self.validated.served_names)
        self.job: Job | None = None
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._embedded_run: threading.Thread | None = None

    def __repr__(self) -> str:
        state = f"up at {self.base_url}" if self.base_url else "down"
        return f"<TemporaryApi {self.job_id} {state}: {', '.join(self.models)}>"

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Job:
        """Submit the API job (or join the one serving the same thing) without waiting for it to serve, and
        return it; it runs until `first_deadline` unless a client extends it (``up()`` does)."""
        self._set_deadline(self.first_deadline, "no client extended the first deadline", only_later=True)
        if not self._ow.embedded:
            self.job = self._ow.jobs.submit(ApiJob, **self._params)
            return self.job
        # the flow runs in this process until its deadline: give it a thread of its own
        self._embedded_run = threading.Thread(
            target=self._ow.jobs.submit, args=(ApiJob,), kwargs=self._params, name=f"{self.job_id}", daemon=True
        )
        self._embedded_run.start()
        give_up = time.monotonic() + timeout
        while True:
            try:
                self.job = self._ow.jobs.retrieve(self.job_id)
                return self.job
            except OWError:
                if not self._embedded_run.is_alive() or time.monotonic() > give_up:
                    raise
                time.sleep(0.5)

    def up(self) -> Any:
        """Start (or join) the API, wait until it serves, and return an `openai.OpenAI` client for it.

        Until it serves, the deadline is `first_deadline` after this call (image pulls and model downloads take
        a while); from then on it is `keep_alive` after the last extension."""
        self.start(timeout=self.timeout)
        try:
            self._wait_until_serving()
        except BaseException:
            self.down(wait=False)
            raise
        # From now on the deadline is this process's: `keep_alive` ahead, moved every keep_alive / 3 seconds.
        self._stop.clear()
        self._set_deadline(self.keep_alive, "the client stopped extending it", only_later=False)
        self._keeper = threading.Thread(target=self._keep_alive, name=f"{self.job_id}-keep-alive", daemon=True)
        self._keeper.start()
        for name in self.models:  # ow.chat sends requests for these models here
            LIVE_APIS[name] = self
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=3)

    def down(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Stop keeping it alive and tell it to stop now; with `wait`, return once its run has ended."""
        self._stop.set()
        for name, api in list(LIVE_APIS.items()):
            if api is self:
                del LIVE_APIS[name]
        if self._keeper:
            self._keeper.join(timeout=5)
        with self._ow.prefect_settings():
            from prefect.variables import Variable

            Variable.set(deadline_variable(self.job_id), {"deadline": 0, "reason": "down"}, overwrite=True, _sync=True)
        self.base_url = None
        if wait:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._ended():
                time.sleep(0.5)

    def __enter__(self) -> Any:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    async def __aenter__(self) -> Any:
        await anyio.to_thread.run_sync(self.up)
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=3)

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.down)

    # ---- internals -----------------------------------------------------------------------------------

    def _keep_alive(self) -> None:
        interval = max(1.0, min(60.0, self.keep_alive / 3))
        while not self._stop.wait(interval):
            with contextlib.suppress(Exception):  # the Prefect API may be restarting: try again next time
                self._set_deadline(self.keep_alive, "the client stopped extending it", only_later=False)

    def _set_deadline(self, seconds: float, reason: str, only_later: bool) -> None:
        from prefect.variables import Variable

        name = deadline_variable(self.job_id)
        value = deadline_value(seconds, reason)
        with self._ow.prefect_settings():
            current = Variable.get(name, default=None, _sync=True) or {}
            if only_later and current.get("deadline", 0) > value["deadline"]:
                return
            Variable.set(name, value, overwrite=True, _sync=True)

    def _wait_until_serving(self) -> None:
        from prefect.blocks.system import Secret
        from prefect.variables import Variable

        give_up = time.monotonic() + self.timeout
        while time.monotonic() < give_up:
            with self._ow.prefect_settings():
                published = Variable.get(endpoint_variable(self.job_id), default=None, _sync=True)
                if published:
                    try:  # the key of the run serving now (each run makes its own and deletes it at its end)
                        self.api_key = Secret.load(key_secret(self.job_id), _sync=True).get()
                    except ValueError:  # that run just ended: wait for the next one, or report the end below
                        published = None
                if published:
                    self.base_url = published["base_url"]
                    self.models = published["models"]
                    return
            if self._ended():
                raise JobFailedError(self._ow.jobs.retrieve(self.job_id), when=" before serving")
            time.sleep(1.0)
        raise TimeoutError(f"API job {self.job_id} was not serving after {self.timeout:g} s")

    def _ended(self) -> bool:
        if self._embedded_run is not None:
            return not self._embedded_run.is_alive()
        try:
            return self._ow.jobs.retrieve(self.job_id).done
        except OWError:
            return False


class Api:
    """``ow.api``: deploy models as temporary OpenAI-compatible APIs."""

    def __init__(self, ow: BaseOpenWeights):
        self._ow = ow

    def deploy(
        self,
        model: str | dict[str, Any] | ModelRef,
        lora_adapters: list[Any] | None = None,
        *,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        first_deadline: float = FIRST_DEADLINE_SECONDS,
        timeout: float = 1800.0,
        **params: Any,
    ) -> TemporaryApi:
        """A `TemporaryApi` for `model` (and `lora_adapters` on the same base); parameters as in `ApiParams`
        (`max_model_len`, `max_num_seqs`, `max_lora_rank`, `quantization`, `kv_cache_dtype`). `keep_alive`:
        how long it outlives its last extension (every minute while up); `first_deadline`: until the first."""
        params = {"model": _plain(model), "lora_adapters": [_plain(a) for a in lora_adapters or []], **params}
        return TemporaryApi(
            self._ow._sync_twin(), params, keep_alive=keep_alive, first_deadline=first_deadline, timeout=timeout
        )

    def create(self, **params: Any) -> Job:
        """Submit a `vllm-api/serve` job and return it without waiting (OpenWeights' ``ow.api.create``); it serves
        until its first deadline (`first_deadline`, 15 minutes) unless a client extends it — ``ow.api.deploy`` is
        the way to keep it up while you use it. Parameters as in `deploy`."""
        options = {key: params.pop(key) for key in ("keep_alive", "first_deadline", "timeout") if key in params}
        return self.deploy(**params, **options).start()

    def multi_deploy(
        self, models: list[Any], base_model_override: str | None = None, **kwargs: Any
    ) -> dict[str, TemporaryApi]:
        """One API per base model, the adapters of each base served together as LoRA modules; a dict from each
        model given (and each base model) to the API serving it, as in OpenWeights. `base_model_override` serves
        every adapter on that base instead of the one it names."""
        by_base: dict[str, list[ModelRef]] = defaultdict(list)
        keys: dict[str, list[str]] = defaultdict(list)
        for model in models:
            ref = resolve_model(adapter_reference(_plain(model), self._ow.storage))
            ref = ModelRef.model_validate(ref) if isinstance(ref, dict) else ModelRef(base=ref)
            if base_model_override:
                ref = ref.model_copy(update={"base": base_model_override})
            by_base.setdefault(ref.base, [])
            if ref.adapter:
                by_base[ref.base].append(ref)
            keys[ref.base].append(model if isinstance(model, str) else adapter_name(ref))
        apis: dict[str, TemporaryApi] = {}
        for base, adapters in by_base.items():
            api = self.deploy(base, [r.model_dump(exclude_none=True) for r in adapters], **kwargs)
            apis |= dict.fromkeys([base, *keys[base]], api)
        return apis


def _plain(model: Any) -> Any:
    return model.model_dump(exclude_none=True) if isinstance(model, ModelRef) else model

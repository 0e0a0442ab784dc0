"""`AsyncRunPodClient`: RunPod REST v2 over httpx, with retries where they are safe.

Retry rules (`ow_prefect.retry`, declared here per call): reads, deletes and pod actions are idempotent and
retried on 429 (waiting for `Retry-After`), 5xx and transport errors, with back-off; auth, payment, capacity and
invalid-spec answers are never retried. A create is not idempotent and never blindly retried: after an answer
that leaves it unknown whether the pod exists (no response, 5xx), the client first looks for a pod with the same
name, and only creates again when there is none. Log streams are read with httpx-sse and not retried (the
caller resumes with `since`).
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import aconnect_sse

from ow_prefect.retry import RetryRules
from ow_prefect.runpod.errors import (
    RunPodError,
    RunPodNotFound,
    RunPodRateLimited,
    RunPodServerError,
    RunPodUnreachable,
    translate,
)
from ow_prefect.runpod.models import GpuType, LogLine, NetworkVolume, Pod

DEFAULT_BASE_URL = "https://api.runpod.io/v2"
CATALOG_TTL_S = 30.0


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context every client of this process shares: what httpx builds by default (certifi's CAs, or
    SSL_CERT_FILE / SSL_CERT_DIR), built once. Building it costs ~30 ms of CPU (parsing the CA bundle), and the
    worker opens a client per run and per reconciler pass: an idle worker spent most of its CPU here."""
    return httpx.create_ssl_context()


class AsyncRunPodClient:
    """One API key, one connection pool. Use as ``async with AsyncRunPodClient(key) as runpod: ...``."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ):
        if not api_key:
            raise ValueError("a RunPod API key is required")
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            verify=tls_context(),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
        )
        # idempotent calls: anything RunPod says may pass (429, 5xx, no answer), RunPod's Retry-After honoured
        self._retry = RetryRules(
            retry_on=lambda error: isinstance(error, RunPodError) and error.retryable,
            attempts=max_attempts,
            initial_s=backoff_s,
            max_s=max_backoff_s,
            retry_after=lambda error: error.retry_after if isinstance(error, RunPodRateLimited) else None,
        )
        self._catalog: dict[tuple[Any, ...], tuple[float, list[GpuType]]] = {}

    def __repr__(self) -> str:  # never shows the key
        return f"AsyncRunPodClient(base_url={str(self._http.base_url)!r})"

    async def __aenter__(self) -> AsyncRunPodClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- transport -----------------------------------------------------------------------------------

    async def _send_once(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise RunPodUnreachable(
                f"no answer from RunPod for {method} {path}: {type(exc).__name__}: {exc}", method=method, path=path
            ) from exc
        if response.is_success:
            return response
        raise translate(
            response.status_code,
            _json_or_text(response),
            method=method,
            path=path,
            retry_after=response.headers.get("Retry-After"),
        )

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An idempotent request, retried by the rules above."""
        return await self._retry.acall(self._send_once, method, path, **kwargs)

    # ---- network volumes ---------------------------------------------------------------------------

    async def get_network_volume(self, volume_id: str) -> NetworkVolume:
        response = await self._send("GET", f"/network-volumes/{quote(volume_id, safe='')}")
        return NetworkVolume.model_validate(response.json())

    # ---- pods ----------------------------------------------------------------------------------------

    async def create_pod(self, body: dict[str, Any]) -> Pod:
        """Create a pod named ``body["name"]``; after an unclear failure, reuse a pod with that name.

        Not idempotent: the same rules as reads, but a try after no answer or a 5xx first looks for the pod
        (a 429 was refused before anything happened)."""
        name = body["name"]

        async def create_or_find() -> Pod:
            try:
                return Pod.model_validate((await self._send_once("POST", "/pods", json=body)).json())
            except (RunPodUnreachable, RunPodServerError):
                existing = [pod for pod in await self.find_pods(name) if pod.name == name and not pod.ended]
                if existing:
                    return existing[0]
                raise

        return await self._retry.acall(create_or_find)

    async def get_pod(self, pod_id: str) -> Pod:
        response = await self._send("GET", f"/pods/{quote(pod_id, safe='')}")
        return Pod.model_validate(response.json())

    async def list_pods(self) -> list[Pod]:
        pods: list[Pod] = []
        params: dict[str, str] = {}
        while True:
            page = (await self._send("GET", "/pods", params=params)).json()
            pods += [Pod.model_validate(p) for p in page.get("pods", [])]
            cursor = (page.get("pagination") or {}).get("nextCursor")
            if not cursor:
                return pods
            params = {"cursor": cursor}

    async def find_pods(self, name_prefix: str) -> list[Pod]:
        """Our pods are found by name (v2 has no labels); see docs/architecture.md."""
        return [p for p in await self.list_pods() if p.name.startswith(name_prefix)]

    async def delete_pod(self, pod_id: str) -> bool:
        """Delete a pod; False when it was already gone (404)."""
        try:
            await self._send("DELETE", f"/pods/{quote(pod_id, safe='')}")
        except RunPodNotFound:
            return False
        return True

    async def pod_action(self, pod_id: str, action: str) -> Pod | None:
        response = await self._send("POST", f"/pods/{quote(pod_id, safe='')}/action", json={"action": action})
        return Pod.model_validate(response.json()) if response.content else None

    async def stream_logs(
        self, pod_id: str, *, source: str | None = "container", tail: int | None = None, since: str | None = None
    ) -> AsyncIterator[LogLine]:
        """Server-sent log events of a pod, as they come (`source=None`: container and system lines)."""
        params = {
            **({"source": source} if source else {}),
            **({"tail": str(tail)} if tail is not None else {}),
            **({"since": since} if since else {}),
        }
        path = f"/pods/{quote(pod_id, safe='')}/logs"
        try:
            async with aconnect_sse(self._http, "GET", path, params=params) as source:
                if not source.response.is_success:
                    await source.response.aread()
                    raise translate(
                        source.response.status_code, _json_or_text(source.response), method="GET", path=path
                    )
                async for event in source.aiter_sse():
                    if event.data:
                        yield LogLine.from_event(event.id or None, event.data)
        except httpx.TransportError as exc:
            raise RunPodUnreachable(
                f"the log stream of pod {pod_id} broke: {type(exc).__name__}: {exc}", method="GET", path=path
            ) from exc

    # ---- catalog -------------------------------------------------------------------------------------

    async def gpu_types(self, *, count: int = 1, cloud: str | None = None, fresh: bool = False) -> list[GpuType]:
        """GPU types with price and current availability for pods; cached for 30 s unless `fresh` (the
        availability is never a reservation)."""
        key = (count, cloud)
        cached = self._catalog.get(key)
        if cached and not fresh and time.monotonic() - cached[0] < CATALOG_TTL_S:
            return cached[1]
        params = {
            "include": "AVAILABILITY",
            "product": "POD",
            "count": str(count),
            **({"cloud": cloud} if cloud else {}),
        }
        gpus = [
            GpuType.model_validate(g) for g in (await self._send("GET", "/catalog/gpus", params=params)).json()["gpus"]
        ]
        self._catalog[key] = (time.monotonic(), gpus)
        return gpus


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text

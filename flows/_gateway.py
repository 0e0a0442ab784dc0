"""The authenticating front of a served model: the only thing a temporary API publishes.

vLLM listens on loopback inside the pod; this gateway listens on the published port and forwards

- ``GET /health``, without a key (RunPod's proxy and the SDK use it to see the server is up), and
- the OpenAI routes the SDK documents (`OPENAI_ROUTES`: models, chat completions, completions, embeddings,
  responses), only with ``Authorization: Bearer <the API's key>``, compared in constant time.

Everything else vLLM registers (``/invocations``, ``/tokenize``, ``/metrics``, ``/v1/load_lora_adapter``, the
``/v1/.../render`` and ``/inference/v1`` routes, ...) is never forwarded: a request for it gets 401 without a
valid key under ``/v1``, else 404 — so new vLLM routes stay closed until they are added here on purpose. The
gateway's own refusals carry the header ``x-ow-refused-by: gateway`` (and OpenAI's error shape).

It counts the requests it is forwarding (`Gateway.in_flight`) for the API's heartbeat: a request is in flight
from the moment it is forwarded until its last byte is sent or its client goes away (then the request to vLLM
is closed too, so vLLM stops generating for nobody). It runs inside the flow's process on uvicorn + httpx, the
ASGI server and HTTP client that Prefect already brings to the serving image's core environment.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx

# (method, path pattern) of every route forwarded with a key; anything else is refused here.
OPENAI_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("GET", r"/v1/models"),
        ("POST", r"/v1/chat/completions"),
        ("POST", r"/v1/completions"),
        ("POST", r"/v1/embeddings"),
        ("POST", r"/v1/responses"),
        ("GET", r"/v1/responses/[A-Za-z0-9_\-]+"),
        ("POST", r"/v1/responses/[A-Za-z0-9_\-]+/cancel"),
    )
)
HEALTH = "/health"
REFUSED_HEADER = "x-ow-refused-by"
MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body larger than this is refused (413) before it is read whole
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded either way; httpx sets the
# request's host and length itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding"}
    | {"upgrade"}
)
NOT_FORWARDED_REQUEST = HOP_BY_HOP | {"host", "content-length"}


def forwarded(method: str, path: str) -> bool:
    """Whether `method path` is one of the OpenAI routes the gateway forwards (with a key)."""
    return any(method == allowed and pattern.fullmatch(path) for allowed, pattern in OPENAI_ROUTES)


class Gateway:
    """An ASGI app forwarding `OPENAI_ROUTES` (with `key`) and `/health` to `upstream` (vLLM on loopback)."""

    def __init__(self, upstream: str, key: str):
        self.upstream = upstream.rstrip("/")
        self._key = key.encode()
        self.in_flight = 0
        self.port: int | None = None  # where `running_gateway` serves it
        self._client: httpx.AsyncClient | None = None
        self._thread: threading.Thread | None = None

    def alive(self) -> bool:
        """Whether the server thread `running_gateway` started is still serving."""
        return self._thread is not None and self._thread.is_alive()

    # ---- ASGI ---------------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets
        method, path = scope["method"], scope["path"]
        if path == HEALTH and method == "GET":
            await self._forward(scope, receive, send, b"", count=False)
        elif not path.startswith("/v1/"):
            await _error(send, 404, f"{path} is not served here: use /health and the OpenAI routes under /v1")
        elif not self._authorized(scope):
            await _error(send, 401, "a valid API key is required (Authorization: Bearer <key>)", "invalid_api_key")
        elif not forwarded(method, path):
            await _error(send, 404, f"{method} {path} is not one of the OpenAI routes served here")
        else:
            try:
                body = await _read_body(scope, receive)
            except _ClientGone:
                return
            if body is None:
                await _error(send, 413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            else:
                await self._forward(scope, receive, send, body, count=True)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Connections to vLLM: unbounded (vLLM queues by itself), no time limit on a long generation, and
                # few kept idle: httpcore looks at every idle connection on each request, which cost 3.4-4.1 ms of
                # gateway CPU per request with 64 in flight against 1.8-2.2 ms with 8 kept (loopback connects are
                # cheap; measured on the 2-core dev VM, upstream CPU unchanged).
                self._client = httpx.AsyncClient(
                    base_url=self.upstream,
                    timeout=httpx.Timeout(None, connect=10),
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=8),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, scope: dict[str, Any]) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, presented = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._key)

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, body: bytes, count: bool) -> None:
        """Send the request to vLLM and stream its answer back; a client that goes away cancels both."""
        if count:
            self.in_flight += 1
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                await self._relay(scope, send, body)
                group.cancel_scope.cancel()
        finally:
            if count:
                self.in_flight -= 1

    async def _relay(self, scope: dict[str, Any], send: Any, body: bytes) -> None:
        assert self._client is not None
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1") not in NOT_FORWARDED_REQUEST]
        query = scope.get("query_string", b"").decode("latin-1")
        url = scope["path"] + (f"?{query}" if query else "")
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _error(send, 502, f"the model server did not answer ({type(exc).__name__})", "upstream_error")
            return
        try:
            # the body goes out as it came (aiter_raw: not decoded), so its length and encoding headers stay true
            headers = [(k.lower(), v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):  # closing the upstream request is what stops vLLM's generation
                await response.aclose()


async def _cancel_on_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class _ClientGone(Exception):
    """The client disconnected before its request was complete: nothing to forward."""


async def _read_body(scope: dict[str, Any], receive: Any) -> bytes | None:
    """The whole request body (OpenAI requests are JSON), or None when it is over `MAX_BODY_BYTES`."""
    declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _error(send: Any, status: int, message: str, code: str | None = None) -> None:
    """An error in OpenAI's shape, so openai-python raises the matching exception (401 → AuthenticationError)."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.append((REFUSED_HEADER.encode(), b"gateway"))  # tells "the gateway said no" from vLLM's own errors
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def running_gateway(upstream: str, key: str, host: str, port: int, timeout: float = 30) -> Iterator[Gateway]:
    """A `Gateway` served by uvicorn on `host:port` (0: a port the system picks, then `gateway.port`) in a thread
    of this process, for the block's duration."""
    import uvicorn

    gateway = Gateway(upstream, key)
    config = uvicorn.Config(
        gateway,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,  # leave the flow's logging (Prefect's handlers) as it is
        log_level="warning",
        access_log=False,
        server_header=False,  # vLLM's own headers pass through
        date_header=False,
        timeout_keep_alive=75,  # longer than proxies keep idle connections, so they close them first
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"the API gateway cannot listen on {host}:{port}: {exc}") from None
    gateway.port = sock.getsockname()[1]  # the one the system picked for port 0
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"ow-gateway-{gateway.port}", daemon=True
    )
    thread.start()
    started = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - started > timeout:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the API gateway did not start on {host}:{gateway.port} within {timeout:g} s")
        time.sleep(0.05)
    gateway._thread = thread
    try:
        yield gateway
    finally:
        server.should_exit = True
        thread.join(timeout=10)

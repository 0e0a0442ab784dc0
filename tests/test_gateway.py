"""The API gateway (flows/_gateway.py) in front of a stand-in for vLLM: which requests it forwards, how it
refuses the rest, streaming, in-flight counting and what a client that goes away does upstream. The same gateway
in front of real vLLM, probed on every route vLLM registers, is in tests/reliability/test_security.py."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flows._gateway import OPENAI_ROUTES, forwarded, running_gateway
from ow_prefect.testing.servers import AppServer, free_port
from tests.helpers import eventually

KEY = "ow-test-gateway-key-0123456789abcdef"


class Upstream:
    """A stand-in for vLLM on loopback: records what reached it; `/v1/chat/completions` streams slowly."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.stream_closed = threading.Event()
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def anything(path: str, request: Request):
            body = await request.body()
            self.seen.append((request.method, f"/{path}", request.headers.get("authorization")))
            if path == "v1/chat/completions" and b'"stream": true' in body:
                return StreamingResponse(self._slow_stream(), media_type="text/event-stream")
            answer = {"path": f"/{path}", "query": str(request.url.query), "body": body.decode()}
            return JSONResponse(answer, headers={"x-upstream": "vllm", "connection": "close"})

    async def _slow_stream(self):
        try:
            for i in range(50):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.1)
            yield b"data: [DONE]\n\n"
        finally:
            self.stream_closed.set()


@pytest.fixture
def upstream():
    up = Upstream()
    with AppServer(up.app) as served:
        up.url = f"http://127.0.0.1:{served.port}"
        yield up


@pytest.fixture
def gateway(upstream):
    with running_gateway(upstream.url, KEY, "127.0.0.1", 0) as gw:  # port 0: the system picks (vllm_api's way)
        assert gw.port
        gw.url = f"http://127.0.0.1:{gw.port}"
        yield gw


def keyed(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_forwarded_routes_are_the_documented_openai_ones():
    assert forwarded("POST", "/v1/chat/completions") and forwarded("GET", "/v1/models")
    assert forwarded("GET", "/v1/responses/resp_123") and forwarded("POST", "/v1/responses/resp_123/cancel")
    for method, path in [
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions/render"),
        ("POST", "/v1/chat/completions/batch"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/models"),
        ("GET", "/v1/responses/../../metrics"),
        ("POST", "/invocations"),
        ("GET", "/metrics"),
    ]:
        assert not forwarded(method, path), (method, path)
    assert len(OPENAI_ROUTES) == 7


def test_health_is_open_and_every_other_route_needs_the_key(gateway, upstream):
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    for headers in ({}, keyed("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json={}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["x-ow-refused-by"] == "gateway"
        assert httpx.post(f"{gateway.url}/invocations", json={}, headers=headers).status_code == 404
    for path in ("/invocations", "/tokenize", "/metrics", "/v1/../invocations", "/ping"):
        assert httpx.post(f"{gateway.url}{path}", json={}, headers=keyed()).status_code == 404, path
    assert httpx.post(f"{gateway.url}/v1/load_lora_adapter", json={}, headers=keyed()).status_code == 404
    assert upstream.seen == [("GET", "/health", None)], "nothing but /health reached the model server"

    answer = httpx.post(f"{gateway.url}/v1/completions?x=1", content=b'{"a": 1}', headers=keyed())
    assert (
        answer.status_code == 200 and answer.headers["x-upstream"] == "vllm" and "x-ow-refused-by" not in answer.headers
    )
    assert answer.json() == {"path": "/v1/completions", "query": "x=1", "body": '{"a": 1}'}
    assert upstream.seen[-1] == ("POST", "/v1/completions", f"Bearer {KEY}")
    assert "connection" not in answer.headers or answer.headers["connection"] != "close"


def test_openai_python_works_through_it_and_gets_an_authentication_error_without_the_key(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
    assert client.models.with_raw_response.list().status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_streams_pass_through_and_are_counted_in_flight_until_the_last_byte(gateway):
    chunks = []
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", content=b'{"stream": true}', headers=keyed(), timeout=30
    ) as response:
        for chunk in response.iter_raw():
            chunks.append(chunk)
            if len(chunks) == 3:
                assert gateway.in_flight == 1
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n") and b"data: 49\n\n" in b"".join(chunks)
    assert eventually(lambda: gateway.in_flight == 0, timeout=5)


def test_a_client_that_goes_away_stops_the_request_upstream(gateway, upstream):
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", content=b'{"stream": true}', headers=keyed(), timeout=30
    ) as response:
        chunks = response.iter_raw()  # kept: a dropped generator closes the response, i.e. the client goes away
        next(chunks)
        assert gateway.in_flight == 1 and not upstream.stream_closed.is_set()
    started = time.monotonic()
    assert eventually(upstream.stream_closed.is_set, timeout=5), "the upstream stream kept going"
    assert time.monotonic() - started < 4  # the whole stream would take 5 s
    assert eventually(lambda: gateway.in_flight == 0, timeout=5)


def test_a_model_server_that_is_down_is_a_502_not_a_hang():
    port = free_port()
    with running_gateway(f"http://127.0.0.1:{free_port()}", KEY, "127.0.0.1", port):
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, headers=keyed(), timeout=15)
        assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_error"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=15).status_code == 502


def test_a_port_in_use_is_a_clear_error(gateway):
    port = int(gateway.url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="cannot listen"), running_gateway(gateway.upstream, KEY, "127.0.0.1", port):
        pass


def test_a_body_over_the_limit_is_refused_before_it_is_forwarded(gateway, upstream, monkeypatch):
    import flows._gateway

    monkeypatch.setattr(flows._gateway, "MAX_BODY_BYTES", 100)
    for body in (b"x" * 101, (b"x" * 60 for _ in range(2))):  # declared length, and chunked without one
        answer = httpx.post(f"{gateway.url}/v1/completions", content=body, headers=keyed())
        assert answer.status_code == 413 and answer.headers["x-ow-refused-by"] == "gateway"
    assert httpx.post(f"{gateway.url}/v1/completions", content=b"x" * 100, headers=keyed()).status_code == 200
    assert [path for _, path, _ in upstream.seen] == ["/v1/completions"]

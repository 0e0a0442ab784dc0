"""A FAKE OpenAI-compatible chat server for the chat client's tests (OpenAI itself has no local stand-in).

It answers `POST /v1/chat/completions` with a deterministic completion (the last user message, reversed) and
can misbehave on demand: `fail(status, times, retry_after)` for 429/5xx, `delay` seconds per request, `drop`
connections without an answer. `requests` counts what reached it, by request body, so tests can tell retries
from duplicates. Not a model of OpenAI's rate limits: just enough to exercise a client.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ow_prefect.testing.servers import AppServer


@dataclass
class Faults:
    status: int = 0
    times: int = 0
    retry_after: float | None = None
    drop: int = 0
    delay: float = 0.0


@dataclass
class FakeOpenAI:
    api_key: str = "sk-fake"
    url: str = ""
    faults: Faults = field(default_factory=Faults)
    requests: Counter = field(default_factory=Counter)  # canonical request body -> times received
    in_flight: int = 0
    peak_in_flight: int = 0

    def fail(self, status: int, times: int = 1, retry_after: float | None = None) -> None:
        self.faults = Faults(status=status, times=times, retry_after=retry_after, delay=self.faults.delay)

    def drop(self, times: int = 1) -> None:
        self.faults.drop = times

    def __enter__(self) -> FakeOpenAI:
        self._served = AppServer(self.app()).__enter__()
        self.url = f"http://127.0.0.1:{self._served.port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.__exit__(*exc)

    def app(self) -> FastAPI:
        app = FastAPI()
        lock = threading.Lock()

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error"}}, 401)
            body = await request.json()
            with lock:
                self.requests[json.dumps(body, sort_keys=True)] += 1
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                faults = self.faults
                fail = faults.times > 0
                drop = faults.drop > 0
                if fail:
                    faults.times -= 1
                elif drop:
                    faults.drop -= 1
            try:
                if faults.delay:
                    await asyncio.sleep(faults.delay)
                if drop:
                    raise ConnectionAbortedError  # uvicorn closes the connection without a response
                if fail:
                    headers = {"retry-after": str(faults.retry_after)} if faults.retry_after is not None else {}
                    error = {"error": {"message": f"injected {faults.status}", "type": "server_error"}}
                    return JSONResponse(error, faults.status, headers=headers)
                return JSONResponse(completion(body))
            finally:
                with lock:
                    self.in_flight -= 1

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": []})

        return app


def completion(body: dict) -> dict:
    text = str(body["messages"][-1]["content"])[::-1][: body.get("max_tokens") or 100]
    return {
        "id": f"chatcmpl-{abs(hash(json.dumps(body, sort_keys=True))) % 10**12}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(text.split()), "total_tokens": 5 + len(text.split())},
    }


if __name__ == "__main__":  # its own process, for benchmarks: python tests/fake_openai.py PORT [DELAY]
    import sys

    server = FakeOpenAI()
    server.faults.delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    import uvicorn

    uvicorn.run(server.app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="critical", access_log=False)

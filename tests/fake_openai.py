"""A FAKE OpenAI-compatible server for the chat client's and batch inference's tests (OpenAI itself has no
local stand-in).

It answers `POST /v1/chat/completions` with a deterministic completion (the last user message, reversed; `n`
choices, the i-th suffixed ` #i`; OpenAI-shaped logprobs, one token per word, when asked) and can misbehave on
demand: `fail(status, times, retry_after)` for 429/5xx, `delay` seconds per request, `drop` connections
without an answer. `requests` counts what reached it, by request body, so tests can tell retries from
duplicates. Not a model of OpenAI's rate limits: just enough to exercise a client.

The Files and Batches APIs follow OpenAI's documented shapes: `POST /v1/files` (multipart, purpose `batch`),
`GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`; `POST /v1/batches`, `GET /v1/batches/{id}`, `POST
/v1/batches/{id}/cancel`. A batch moves one status per retrieve (validating → in_progress → completed) unless
`hold_batches` is set; when it completes, every line is answered like a chat request, written to the output
file in *reverse* order (OpenAI does not promise input order), and a request whose last message contains
`FAIL` goes to the error file with a 400 (and gets a 400 from the chat route too). `batch_outcome` makes batches
fail validation or expire half done instead. `batches` and `files` hold what was created, for assertions.
"""

from __future__ import annotations

import asyncio
import email.parser
import itertools
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ow_prefect.testing.servers import AppServer


class _Unauthorized(Exception):
    """A Files or Batches request without the server's key."""


INJECTED_400 = {"error": {"message": "injected failure", "type": "invalid_request_error", "code": None}}


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
    files: dict = field(default_factory=dict)  # file id -> {"purpose", "filename", "content": bytes}
    batches: dict = field(default_factory=dict)  # batch id -> OpenAI's Batch object (a dict)
    hold_batches: bool = False  # batches stay in_progress until this is False again
    batch_outcome: str = "completed"  # or "failed" (validation: no output), "expired" (the first half answered)

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
                if fail:  # before the content check, as a rate limit is: whichever request it hits is retried
                    headers = {"retry-after": str(faults.retry_after)} if faults.retry_after is not None else {}
                    error = {"error": {"message": f"injected {faults.status}", "type": "server_error"}}
                    return JSONResponse(error, faults.status, headers=headers)
                if "FAIL" in str(body["messages"][-1]["content"]):
                    return JSONResponse(INJECTED_400, 400)
                return JSONResponse(completion(body))
            finally:
                with lock:
                    self.in_flight -= 1

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": []})

        self._batch_routes(app)
        return app

    def _batch_routes(self, app: FastAPI) -> None:
        ids = itertools.count(1)

        # The key is checked on these routes only, by a dependency: an HTTP middleware would slow every chat
        # request too (bench/chat.py measures the client against this server).
        def authorized(request: Request) -> None:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise _Unauthorized

        @app.exception_handler(_Unauthorized)
        async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
            return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error"}}, 401)

        router = APIRouter(dependencies=[Depends(authorized)])

        def not_found(what: str) -> JSONResponse:
            return JSONResponse({"error": {"message": f"No such {what}", "type": "invalid_request_error"}}, 404)

        def file_object(file_id: str) -> dict:
            entry = self.files[file_id]
            return {
                "id": file_id,
                "object": "file",
                "bytes": len(entry["content"]),
                "created_at": int(time.time()),
                "filename": entry["filename"],
                "purpose": entry["purpose"],
                "status": "processed",
            }

        def store(content: bytes, purpose: str, filename: str) -> str:
            file_id = f"file-{next(ids)}"
            self.files[file_id] = {"purpose": purpose, "filename": filename, "content": content}
            return file_id

        @router.post("/v1/files")
        async def upload(request: Request):
            parts = multipart_fields(request.headers["content-type"], await request.body())
            file_id = store(parts["file"][1], parts["purpose"][1].decode(), parts["file"][0] or "upload")
            return JSONResponse(file_object(file_id))

        @router.get("/v1/files/{file_id}/content")
        async def content(file_id: str):
            if file_id not in self.files:
                return not_found("file")
            return Response(self.files[file_id]["content"], media_type="application/octet-stream")

        @router.delete("/v1/files/{file_id}")
        async def delete(file_id: str):
            if file_id not in self.files:
                return not_found("file")
            self.files[file_id]["deleted"] = True
            return JSONResponse({"id": file_id, "object": "file", "deleted": True})

        @router.post("/v1/batches")
        async def create_batch(request: Request):
            body = await request.json()
            if body.get("input_file_id") not in self.files or body.get("completion_window") != "24h":
                return JSONResponse({"error": {"message": "bad batch request", "type": "invalid_request_error"}}, 400)
            batch_id = f"batch_{next(ids)}"
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "completion_window": "24h",
                "created_at": int(time.time()),
                "input_file_id": body["input_file_id"],
                "status": "validating",
                "metadata": body.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }
            return JSONResponse(self.batches[batch_id])

        @router.get("/v1/batches/{batch_id}")
        async def retrieve_batch(batch_id: str):
            if batch_id not in self.batches:
                return not_found("batch")
            batch = self.batches[batch_id]
            if batch["status"] == "validating":
                batch["status"] = "in_progress"
            elif batch["status"] == "cancelling":
                batch["status"] = "cancelled"
            elif batch["status"] == "in_progress" and not self.hold_batches:
                self._finish(batch, store)
            return JSONResponse(batch)

        @router.post("/v1/batches/{batch_id}/cancel")
        async def cancel_batch(batch_id: str):
            if batch_id not in self.batches:
                return not_found("batch")
            batch = self.batches[batch_id]
            if batch["status"] in ("validating", "in_progress"):
                batch["status"] = "cancelling"
            return JSONResponse(batch)

        app.include_router(router)

    def _finish(self, batch: dict, store) -> None:
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]]["content"].splitlines() if line]
        if self.batch_outcome == "failed":
            error = {"code": "invalid_json_line", "message": "injected validation failure", "line": 1, "param": None}
            batch.update(status="failed", errors={"object": "list", "data": [error]})
            return
        outputs, errors = [], []
        for number, line in enumerate(lines):
            body = line["body"]
            if self.batch_outcome == "expired" and number >= len(lines) // 2:  # OpenAI's shape for expired requests
                expired = {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the batch expired.",
                }
                errors.append(
                    {"id": f"batch_req_{number}", "custom_id": line["custom_id"], "response": None, "error": expired}
                )
                continue
            self.requests[json.dumps(body, sort_keys=True)] += 1
            record = {"id": f"batch_req_{number}", "custom_id": line["custom_id"], "error": None}
            if "FAIL" in str(body["messages"][-1]["content"]):
                errors.append({**record, "response": {"status_code": 400, "request_id": "req", "body": INJECTED_400}})
            else:
                outputs.append(
                    {**record, "response": {"status_code": 200, "request_id": "req", "body": completion(body)}}
                )
        batch["status"] = "expired" if self.batch_outcome == "expired" else "completed"
        batch["request_counts"] = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}
        for key, records in (("output_file_id", outputs), ("error_file_id", errors)):
            if records:
                content = "".join(json.dumps(r) + "\n" for r in reversed(records)).encode()
                batch[key] = store(content, "batch_output", f"{batch['id']}-{key}.jsonl")


def multipart_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (python-multipart is not installed here)."""
    message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in message.get_payload()
    }


def completion(body: dict) -> dict:
    text = str(body["messages"][-1]["content"])[::-1][
        : body.get("max_tokens") or body.get("max_completion_tokens") or 100
    ]
    texts = [text + (f" #{i}" if i else "") for i in range(body.get("n") or 1)]
    choices = []
    for index, content in enumerate(texts):
        choice = {"index": index, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if body.get("logprobs"):
            top = body.get("top_logprobs") or 0
            choice["logprobs"] = {"content": [token_logprob(word, top) for word in content.split()]}
        choices.append(choice)
    tokens = sum(len(content.split()) for content in texts)
    return {
        "id": f"chatcmpl-{abs(hash(json.dumps(body, sort_keys=True))) % 10**12}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": choices,
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
    }


def token_logprob(token: str, top: int) -> dict:
    alternatives = [
        {"token": token if i == 0 else f"{token}~{i}", "logprob": -0.25 * (i + 1), "bytes": None} for i in range(top)
    ]
    return {"token": token, "logprob": -0.25, "bytes": None, "top_logprobs": alternatives}


if __name__ == "__main__":  # its own process, for benchmarks: python tests/fake_openai.py PORT [DELAY]
    import sys

    server = FakeOpenAI()
    server.faults.delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    import uvicorn

    uvicorn.run(server.app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="critical", access_log=False)

"""FakeRunPod's HTTP side: the FastAPI routes of RunPod's v2 pod and catalog API (`Routes`, a mixin of
`FakeRunPod`) behind `_Gateway`, the outermost ASGI layer, which records each request, applies the faults a test
injected (a status, or a response lost on the way) and checks the bearer token."""

import asyncio
import json
import re
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ow_prefect.testing.fake_runpod.catalog import CatalogFilters
from ow_prefect.testing.fake_runpod.logs import _as_utc
from ow_prefect.testing.fake_runpod.spec import Problem, spec_schemas

if TYPE_CHECKING:
    from ow_prefect.testing.fake_runpod.fake import FakeRunPod


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as error:
        raise Problem(400, f"request body is not valid JSON: {error}") from error


JsonBody = Annotated[Any, Depends(_json_body)]


class Routes:
    """The API's routes, each a thin call into `FakeRunPod` (a mixin of it)."""

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="FakeRunPod", openapi_url=None, docs_url=None, redoc_url=None)
        app.add_exception_handler(Problem, _problem_handler)
        app.add_exception_handler(RequestValidationError, _request_validation_handler)

        @app.post("/v2/pods", status_code=201)
        def create_pod(body: JsonBody):
            return self._create_pod(body)

        @app.get("/v2/pods")
        def list_pods(cursor: str | None = None, includeClusterPods: bool = False):  # noqa: N803 (spec's name)
            return self._list_pods(cursor)

        @app.get("/v2/pods/{pod_id}")
        def get_pod(pod_id: str):
            return self._get_pod(pod_id)

        @app.patch("/v2/pods/{pod_id}")
        def update_pod(pod_id: str, body: JsonBody):
            return self._update_pod(pod_id, body)

        @app.delete("/v2/pods/{pod_id}", status_code=204)
        def delete_pod(pod_id: str):
            self._delete_pod(pod_id)
            return Response(status_code=204)

        @app.post("/v2/pods/{pod_id}/action")
        def pod_action(pod_id: str, body: JsonBody):
            pod = self._pod_action(pod_id, body)
            return Response(status_code=204) if pod is None else pod

        @app.get("/v2/pods/{pod_id}/logs")
        def pod_logs(
            pod_id: str,
            source: Literal["container", "system"] | None = None,
            tail: Annotated[int, Query(ge=0, le=5000)] = 100,
            since: datetime | None = None,
            last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        ):
            return self._open_log_stream(pod_id, source, tail, _as_utc(since), last_event_id)

        @app.get("/v2/network-volumes")
        def list_network_volumes():
            return self._list_network_volumes()

        @app.get("/v2/network-volumes/{volume_id}")
        def get_network_volume(volume_id: str):
            return self._get_network_volume(volume_id)

        @app.get("/v2/catalog/gpus")
        def list_gpu_types(filters: CatalogFilters):
            return self._list_gpu_types(filters)

        @app.get("/v2/catalog/gpus/{gpu_id}")
        def get_gpu_type(gpu_id: str, filters: CatalogFilters):
            return self._get_gpu_type(gpu_id, filters)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
        def not_in_fake(path: str, request: Request):
            raise _unrouted_problem(request.method, f"/{path}")

        return app


class _Gateway:
    """The outermost ASGI layer: records each request, applies injected faults, checks the bearer token."""

    def __init__(self, app: FastAPI, fake: "FakeRunPod") -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        fault = self.fake._record_request(scope["method"], scope["path"], body)
        replay = _replaying(body, receive)
        if fault and not fault.lose_response:
            await fault.problem().response()(scope, replay, send)
            return
        auth_problem = self._auth_problem(scope)
        handler = auth_problem.response() if auth_problem else self.app
        if fault is None:
            await handler(scope, replay, send)
            return
        await handler(scope, replay, _discard)
        await _drop_connection(send)

    def _auth_problem(self, scope: dict) -> Problem | None:
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not authorization.startswith(b"Bearer "):
            return Problem(401, "missing bearer token", headers=challenge)
        if not secrets.compare_digest(authorization.removeprefix(b"Bearer "), self.fake.api_key.encode()):
            return Problem(401, "invalid bearer token", headers=challenge)
        return None


def _unrouted_problem(method: str, path: str) -> Problem:
    """404 for paths RunPod does not have, 405 for methods it does not take, 501 for what the fake leaves out."""
    methods = {
        spec_method.upper()
        for spec_path, operations in spec_schemas().spec["paths"].items()
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", spec_path), path)
        for spec_method in operations
        if spec_method != "parameters"
    }
    if not methods:
        return Problem(404, f"no route {path} in RunPod's API v2")
    if method not in methods:
        return Problem(405, f"{method} is not allowed on {path}", headers={"Allow": ", ".join(sorted(methods))})
    return Problem(501, f"{method} {path} is part of RunPod's API but not implemented by FakeRunPod")


async def _problem_handler(request: Request, problem: Problem) -> JSONResponse:
    return problem.response()


async def _request_validation_handler(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = [f"{'.'.join(str(part) for part in issue['loc'])}: {issue['msg']}" for issue in error.errors()]
    return Problem(422, "Request validation failed: " + "; ".join(errors), errors=errors).response()


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the app the body the gateway already read, then defers to the server's."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _discard(message: dict) -> None:
    """A `send` that drops the response of a request whose response is to be lost."""


async def _drop_connection(send: Any) -> None:
    """Close the client's connection without sending a byte, as when a response is lost on the way.

    ASGI cannot abort a connection, and a response head without its body is a complete 204, so this takes
    the socket from uvicorn's h11 request cycle (the bound method `send` belongs to).
    """
    send.__self__.transport.close()
    await asyncio.sleep(0)  # let uvicorn see the disconnect, so it does not write a 500 to the closed socket

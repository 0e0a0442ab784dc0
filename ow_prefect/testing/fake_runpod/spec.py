"""FakeRunPod's contract: RunPod's REST v2 spec (`runpod-openapi-v2.json`, shipped next to this module), requests
checked against it as strictly as RunPod checks them, and errors answered as problem+json (`Problem`)."""

import json
import re
from functools import cache, reduce
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_FILE = Path(__file__).with_name("runpod-openapi-v2.json")
SPEC_URI = "urn:runpod:openapi-v2"
PORT_PATTERN = re.compile(r"(\d{1,5})/(http|tcp)")


class SpecSchemas:
    """The request and response schemas of RunPod's spec, checked the way RunPod's strict API checks bodies."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(SPEC_URI, resource)
        self._validators: dict[str, Draft202012Validator] = {}

    def errors(self, schema_name: str, instance: Any) -> list[str]:
        """Each violation of `#/components/schemas/<schema_name>` as `<json path>: <message>`; empty if valid."""
        messages = []
        for error in sorted(self._validator(schema_name).iter_errors(instance), key=lambda e: e.json_path):
            if error.validator in ("unevaluatedProperties", "additionalProperties"):
                messages += [
                    f"{error.json_path}: additional properties {name!r} not allowed"
                    for name in self._undeclared(error.schema, error.instance)
                ]
            else:
                messages.append(f"{error.json_path}: {error.message}")
        return messages

    def properties_of(self, schema_name: str) -> set[str]:
        """The field names that `schema_name` or any schema in its allOf chain declares."""
        return self._declared({"$ref": f"#/components/schemas/{schema_name}"})

    def _validator(self, schema_name: str) -> Draft202012Validator:
        if schema_name not in self._validators:
            schema = {"$ref": f"{SPEC_URI}#/components/schemas/{schema_name}"}
            self._validators[schema_name] = Draft202012Validator(schema, registry=self._registry)
        return self._validators[schema_name]

    def _undeclared(self, schema: dict[str, Any], instance: dict[str, Any]) -> list[str]:
        declared = self._declared(schema)
        return [name for name in instance if name not in declared]

    def _declared(self, schema: dict[str, Any]) -> set[str]:
        names = set(schema.get("properties", ()))
        for part in schema.get("allOf", ()):
            names |= self._declared(part)
        if "$ref" in schema:
            target = reduce(lambda node, key: node[key], schema["$ref"].removeprefix("#/").split("/"), self.spec)
            names |= self._declared(target)
        return names


@cache
def spec_schemas() -> SpecSchemas:
    """The schemas of the shipped spec, loaded once per process."""
    return SpecSchemas(json.loads(SPEC_FILE.read_text()))


class Problem(Exception):
    """An error answered as problem+json (RFC 9457), as RunPod answers every error."""

    def __init__(
        self, status: int, detail: str, *, errors: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        return JSONResponse(body, self.status, headers=self.headers, media_type="application/problem+json")


def _check_create_rules(body: dict[str, Any]) -> None:
    """The cross-field rules the spec leaves to RunPod's handler, answered 400 rather than 422."""
    if ("gpu" in body) == ("cpu" in body):
        raise Problem(400, "exactly one of gpu or cpu must be set")
    mounts = body.get("mounts", {})
    if "persistent" in mounts and "network" in mounts:
        raise Problem(400, "mounts.persistent and mounts.network are mutually exclusive")
    if "persistent" in mounts and "cpu" in body:
        raise Problem(400, "mounts.persistent is not allowed on CPU pods; use a network volume")
    gpu = body.get("gpu", {})
    if gpu.get("allowedCudaVersions") and "minCudaVersion" in gpu:
        raise Problem(400, "gpu.allowedCudaVersions and gpu.minCudaVersion are mutually exclusive")
    _check_ports(body.get("ports", []))


def _check_ports(ports: list[str]) -> None:
    for port in ports:
        if not PORT_PATTERN.fullmatch(port):
            raise Problem(400, f"invalid port {port!r}: expected <port>/http or <port>/tcp, e.g. 8000/http")

"""Write docs/reference.md from the pydantic models themselves, so the parameter reference cannot drift.

    python -m ow_prefect.reference            # rewrite docs/reference.md
    python -m ow_prefect.reference --check    # exit 1 when the committed file is stale (a test runs this)

Covers every registered job type's parameters (and the models they nest), the `runpod` work pool's job
variables and the `OW_*` settings.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ow_prefect.jobs.base import Job, project_root
from ow_prefect.jobs.registry import job_types

OUTPUT = Path("docs") / "reference.md"
HEADER = """# Reference: job parameters, RunPod job variables, settings

Generated from the pydantic models by `python -m ow_prefect.reference`; do not edit by hand (a test fails when
this file is stale). Every job type is `ow.<name>.create(**parameters)` in the SDK and a deployment you can run
from the Prefect UI or `prefect deployment run <deployment> --param name=value`.
"""


def type_of(schema: dict[str, Any]) -> str:
    """A short human type for a JSON schema property."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "anyOf" in schema:
        return " | ".join(type_of(option) for option in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{type_of(schema.get('items', {}))}]"
    if kind == "object" and "additionalProperties" in schema:
        values = schema["additionalProperties"]
        return f"dict[str, {type_of(values) if isinstance(values, dict) else 'any'}]"
    return {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "None"}.get(kind, kind)


CONSTRAINTS = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


def constraints_of(schema: dict[str, Any]) -> str:
    found = [f"{sign} {schema[key]}" for key, sign in CONSTRAINTS.items() if key in schema]
    if "pattern" in schema:
        found.append(f"matches `{schema['pattern']}`")
    return ", ".join(found)


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def fields_table(model: type[BaseModel], skip: frozenset[str] = frozenset(), env_prefix: str = "") -> list[str]:
    schema = model.model_json_schema(mode="validation")
    required = set(schema.get("required", []))
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        prop = schema["properties"].get(field.alias or name, {})
        if name in required:
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{json.dumps(field.get_default(call_default_factory=True), default=str)}`"
        else:
            default = f"`{json.dumps(field.default, default=str)}`"
        description = field.description or ""
        if limits := constraints_of(prop):
            description = f"{description} ({limits})" if description else limits
        label = f"{env_prefix}{name.upper()}" if env_prefix else name
        lines.append(f"| `{label}` | {cell(type_of(prop))} | {cell(default)} | {cell(description)} |")
    return lines


def nested_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """Models a parameter model refers to (e.g. a model reference), in first-seen order."""
    found: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.append(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for argument in getattr(annotation, "__args__", ()) or ():
            visit(argument)

    for field in model.model_fields.values():
        visit(field.annotation)
    return found


def deployments_of(job_cls: type[Job]) -> list[str]:
    if "loss" in job_cls.params.model_fields:
        losses = job_cls.params.model_fields["loss"].annotation.__args__
        return [f"{job_cls.deployment.split('/')[0]}/{loss}" for loss in losses]
    return [job_cls.deployment, *getattr(job_cls, "other_deployments", ())]


def job_section(name: str, job_cls: type[Job]) -> list[str]:
    image = "OW_SERVE_IMAGE" if job_cls.image_setting == "serve_image" else "OW_TRAIN_IMAGE"
    lines = [f"## `ow.{name}`", ""]
    if doc := inspect.getdoc(job_cls):
        lines += [doc, ""]
    deployments = ", ".join(f"`{d}`" for d in deployments_of(job_cls))
    lines += [
        f"Deployments: {deployments} (and `…-local`). Job ids: `{job_cls.id_prefix or name}-…`. Image: `{image}`.",
        "",
    ]
    lines += fields_table(job_cls.params) + [""]
    for nested in nested_models(job_cls.params):
        lines += [f"`{nested.__name__}`: {inspect.getdoc(nested) or ''}".strip(), ""]
        lines += fields_table(nested) + [""]
    return lines


@contextlib.contextmanager
def settings_defaults() -> Iterator[None]:
    """No OW_* variables and no .env while defaults are computed (some come from the settings), so the file
    does not depend on who generates it."""
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("OW_")}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as empty:
        os.chdir(empty)
        try:
            yield
        finally:
            os.chdir(cwd)
            os.environ.update(saved)


def render() -> str:
    with settings_defaults():
        return _render()


def _render() -> str:
    import ow_prefect.client  # noqa: F401  (registers every built-in job type)
    from ow_prefect.settings import OWSettings
    from ow_prefect.workers.runpod import RunPodVariables

    lines = [HEADER, "## Job types", ""]
    # the built-in types only: a user's (or a test's) registered types are not part of the project's reference
    types = {name: cls for name, cls in sorted(job_types().items()) if cls.__module__.startswith("ow_prefect.")}
    lines += [f"- [`ow.{name}`](#ow{name}): {deployments_of(cls)[0]}" for name, cls in types.items()]
    lines.append("")
    for name, job_cls in types.items():
        lines += job_section(name, job_cls)
    lines += [
        "## `runpod` work pool: job variables",
        "",
        "Set on the pool (defaults), a deployment (`job_variables:` in prefect.yaml) or one run "
        "(`--job-variable`). The SDK sets `image` and `min_vram_gb` per run. See [runpod.md](runpod.md).",
        "",
    ]
    lines += fields_table(RunPodVariables, skip=frozenset({"command", "env", "name", "labels"})) + [""]
    lines += ["## Settings (`OW_*` environment variables or `.env`)", ""]
    lines += fields_table(OWSettings, env_prefix="OW_")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ow_prefect.reference", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the file differs from what would be written")
    args = parser.parse_args(argv)
    path = project_root() / OUTPUT
    text = render()
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{OUTPUT} is stale: run `python -m ow_prefect.reference` and commit it", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/coming-from-openweights.md's table is complete: every public name of the SDK's clients and resources
and every parameter of every built-in job type has a row, every row says same / alias / different, and every
OpenWeights name we studied (its client, cookbook and seed README) has a row too."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import pytest

from ow_prefect import AsyncOpenWeights, FileObject, Job, OpenWeights
from ow_prefect.chat import AsyncChat, Chat
from ow_prefect.client.api import Api, TemporaryApi
from ow_prefect.client.files import AsyncFiles, Files
from ow_prefect.client.jobs import AsyncJobs, Jobs, JobTypeResource
from ow_prefect.client.runs import AsyncEvents, AsyncRuns, Events, Run, Runs
from ow_prefect.jobs.custom import CustomJob
from ow_prefect.jobs.registry import job_types
from ow_prefect.run_log import CurrentRun
from tests.conftest import ROOT

DOC = ROOT / "docs" / "coming-from-openweights.md"
STATUSES = ("same", "alias", "different")
SHARED_SECTIONS = {"weighted_sft": "fine_tuning", "vllm_api": "api"}  # documented with another type's rows

# OpenWeights' public names, from its client (openweights/client/*.py), job types and cookbook: each must be in
# the first column.
UPSTREAM = [
    "OpenWeights()",
    "auth_token",
    "use_async",
    "deploy_kwargs",
    "ow.files",
    "ow.jobs",
    "ow.runs",
    "ow.events",
    "ow.run",
    "ow.chat",
    "ow.sync_chat",
    "ow.async_chat",
    "ow.api",
    "ow.hf_org",
    "ow.organization_id",
    "ow.files.upload",
    "ow.files.create",
    "ow.files.content",
    "ow.files.get_by_id",
    "ow.files.validate",
    'purpose="preferences"',
    'file["id"]',
    "message-level `weight`",
    "ow.jobs.list",
    "ow.jobs.retrieve",
    "ow.jobs.cancel",
    "ow.jobs.restart",
    "ow.jobs.find",
    "ow.jobs.get_or_create_or_reset",
    "ow.jobs.compute_id",
    "get_training_config",
    "allowed_hardware",
    "cloud_type",
    "worker_max_uptime",
    "base_image",
    "create_on_failed_status",
    'job.params["validated_params"]',
    'job.outputs["file"]',
    "job.runs",
    "job.download(dir, only_last_run=True)",
    "job.refresh()",
    "job.model",
    "job.script",
    "job.allowed_hardware",
    "job.docker_image",
    "job.worker_id",
    "job.timeout",
    "ow.runs.list",
    "run.log_file",
    "run.events",
    "run.download",
    "ow.events.list",
    "ow.events.latest",
    "ow.run.log",
    "ow.api.deploy",
    "ow.api.multi_deploy",
    "base_model_override",
    "ow.api.create",
    "api.up()",
    "api.async_up()",
    "api.base_url",
    "api.pod_id",
    "ow.chat.completions.create",
    "ow.chat.kill",
    "ow.chat.request_timeout",
    "@register",
    "class MyJob(Jobs)",
    "mount =",
    "get_entrypoint",
    "id_predix",
    "_upload_mounted_files",
    "is_peft",
    "output_dir",
    "sdft",
    "grpo",
    'loss="sft"',
    "learning_rate",
    "max_grad_norm",
    "ft_id_suffix",
    "finetuned_model_id",
    "model_naming_extra_parameters",
    "job_id_suffix",
    "load_format",
    "reset_cache_idx",
    "max_loras",
    "max_lora_rank",
    'options="--top-p 0.9',
    "save_dir",
    "global_record_file",
    "gpu_util",
    "ntrain",
]


def parse_rows() -> list[tuple[str, list[str]]]:
    """(heading, [OpenWeights, ow_prefect, status, why]) for each table row of "Every name, side by side"."""
    text = DOC.read_text()
    section = text[text.index("## Every name, side by side") :]
    section = section[: section.index("\n## ", 1)]
    rows, heading = [], ""
    for line in section.splitlines():
        if line.startswith("#"):
            heading = line
        elif line.startswith("|") and not line.startswith("|---") and not line.startswith("| OpenWeights |"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append((heading, cells))
    return rows


ROWS = parse_rows()


def spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def ours(section: str | None = None) -> list[str]:
    """Code spans of the ow_prefect column (of the tables under headings containing `section`)."""
    return [s for heading, cells in ROWS if section is None or section in heading for s in spans(cells[1])]


def covered(prefix: str, name: str, section: str | None = None) -> bool:
    pattern = re.compile(rf"^{re.escape(prefix)}{re.escape(name)}(?![A-Za-z0-9_])")
    return any(pattern.match(span) for span in ours(section))


def public(cls: type) -> set[str]:
    """Public names of a class: its attributes and what its __init__ (and its bases') assigns to `self`."""
    names = {n for n in dir(cls) if not n.startswith("_")}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        for node in ast.walk(tree):
            assigned = isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            on_self = assigned and isinstance(node.value, ast.Name) and node.value.id == "self"
            if on_self and not node.attr.startswith("_"):
                names.add(node.attr)
    return names


def test_every_row_says_same_alias_or_different_and_why_it_differs():
    assert len(ROWS) > 100
    for heading, cells in ROWS:
        assert len(cells) == 4, f"{heading}: a row needs 4 cells: {cells}"
        upstream, mine, status, why = cells
        assert status in STATUSES, f"{heading}: {upstream} -> {mine}: status {status!r} is not one of {STATUSES}"
        assert upstream and mine, f"{heading}: an empty cell (write — for a name one side lacks): {cells}"
        if status == "different":
            assert why, f"{heading}: {upstream} -> {mine} is different: say why"


RESOURCES = [
    (OpenWeights, "ow."),
    (AsyncOpenWeights, "ow."),
    (Files, "ow.files."),
    (AsyncFiles, "ow.files."),
    (Jobs, "ow.jobs."),
    (AsyncJobs, "ow.jobs."),
    (JobTypeResource, "ow.<job type>."),
    (Runs, "ow.runs."),
    (AsyncRuns, "ow.runs."),
    (Events, "ow.events."),
    (AsyncEvents, "ow.events."),
    (CurrentRun, "ow.run."),
    (Run, "run."),
    (Api, "ow.api."),
    (TemporaryApi, "api."),
    (Chat, "ow.chat."),
    (AsyncChat, "ow.chat."),
]


@pytest.mark.parametrize("cls,prefix", RESOURCES, ids=[f"{c.__module__}.{c.__name__}" for c, _ in RESOURCES])
def test_every_public_name_of_the_clients_and_resources_has_a_row(cls, prefix):
    missing = sorted(name for name in public(cls) if not covered(prefix, name))
    assert not missing, f"docs/coming-from-openweights.md has no row for {[prefix + n for n in missing]}"


def _type_level(name: str) -> bool:
    """A name of the job type (class attribute or classmethod), not of a submitted job's handle."""
    attr = inspect.getattr_static(Job, name, None)
    return isinstance(attr, classmethod | staticmethod) or name in Job.__annotations__


def test_every_name_of_the_job_handle_and_of_job_types_has_a_row():
    handle = {n for n in public(Job) if not _type_level(n)} | {"params", "type", "outputs"}
    missing = sorted(n for n in handle if not covered("job.", n))
    assert not missing, f"no row for {['job.' + n for n in missing]}"
    custom = " ".join(" ".join(cells) for heading, cells in ROWS if "Custom job types" in heading)
    type_level = {n for n in public(Job) if _type_level(n)} | {n for n in public(CustomJob) if n not in public(Job)}
    missing = sorted(n for n in type_level if f"`{n}`" not in custom and not covered("CustomJob.", n))
    assert not missing, f"the Custom job types table names none of {missing}"


def test_every_field_of_a_stored_file_has_a_row():
    missing = sorted(n for n in [*FileObject.model_fields, "get"] if not covered("file.", n))
    assert not missing, f"no row for {['file.' + n for n in missing]}"


BUILT_IN = sorted(name for name, cls in job_types().items() if cls.__module__.startswith("ow_prefect."))


@pytest.mark.parametrize("job_type", BUILT_IN)
def test_every_parameter_of_every_built_in_job_type_has_a_row(job_type):
    section = f"ow.{SHARED_SECTIONS.get(job_type, job_type)}."
    assert any(section in heading for heading, _ in ROWS), f"no table for ow.{job_type}.create(...)"
    fields = job_types()[job_type].params.model_fields
    missing = sorted(field for field in fields if not covered("", field, section))
    assert not missing, f"the table of ow.{job_type}.create(...) has no row for {missing}"


def test_every_openweights_name_we_know_has_a_row():
    first_column = " ".join(cells[0] for _, cells in ROWS)
    missing = [name for name in UPSTREAM if name not in first_column]
    assert not missing, f"OpenWeights names without a row: {missing}"

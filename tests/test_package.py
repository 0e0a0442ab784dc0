"""Packaging: a light `import ow_prefect`, the Prefect collection entry point, prefect.yaml in step with the
job types."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from ow_prefect.jobs import job_types, project_root
from ow_prefect.jobs.finetune import FineTuneJob

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "trl", "vllm", "peft", "prefect", "boto3"]
HEAVY += ["tenacity", "httpx_sse"]  # light, but only the calls that retry or stream need them


def test_import_is_fast_and_light():
    # CPU seconds of the import, not wall: a loaded machine (the suite's other process) stretches wall time only
    code = (
        "import json, sys, time; t = time.process_time(); import ow_prefect; "
        "elapsed = time.process_time() - t; "
        f"print(json.dumps({{'s': elapsed, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["heavy"] == []
    assert out["s"] < 1.0, f"import ow_prefect took {out['s']:.2f} CPU seconds"


def test_registered_as_prefect_collection():
    names = {ep.name: ep.value for ep in entry_points(group="prefect.collections")}
    assert names.get("ow_prefect") == "ow_prefect"


def test_prefect_loads_the_collection_and_its_workers():
    code = (
        "from prefect.plugins import load_prefect_collections; import sys; "
        "load_prefect_collections(); print('ow_prefect.workers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("True")


def test_prefect_yaml_matches_job_types():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    names_by_entrypoint: dict[str, set[str]] = {}
    for d in deployments:
        names_by_entrypoint.setdefault(d["entrypoint"], set()).add(d["name"])
    for name, job_cls in job_types().items():
        assert job_cls.entrypoint in names_by_entrypoint, f"{name}: {job_cls.entrypoint} not in prefect.yaml"
        assert job_cls.deployment.split("/")[1] in names_by_entrypoint[job_cls.entrypoint]
        for path in job_cls.code:
            assert (project_root() / path).exists(), f"{name}: code file {path} missing"
    losses = {"sft", "dpo", "orpo", "weighted-sft"}
    assert names_by_entrypoint[FineTuneJob.entrypoint] == losses | {f"{loss}-local" for loss in losses}
    presets = {d["name"]: d["parameters"]["loss"] for d in deployments if d["entrypoint"] == FineTuneJob.entrypoint}
    expected = {
        name: name.removesuffix("-local").replace("-", "_") for name in names_by_entrypoint[FineTuneJob.entrypoint]
    }
    assert presets == expected


def test_project_root_is_the_repository():
    assert (project_root() / "flows" / "custom.py").exists()

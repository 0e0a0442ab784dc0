"""Packaging: a light `import ow_prefect`, the Prefect collection entry point, prefect.yaml in step with the
job types."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from ow_prefect.jobs import job_types, project_root
from ow_prefect.jobs.finetune import FineTuneJob

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "transformers", "trl", "vllm", "peft", "prefect", "boto3"]
HEAVY += ["tenacity", "httpx_sse"]  # light, but only the calls that retry or stream need them


def imported(statement: str, watched: list[str]) -> dict:
    """CPU seconds of `statement` in a fresh interpreter (not wall: a loaded machine stretches wall time only),
    and which of `watched` it loaded."""
    code = (
        f"import json, sys, time; t = time.process_time(); {statement}; "
        "elapsed = time.process_time() - t; "
        f"print(json.dumps({{'s': elapsed, 'loaded': [m for m in {watched!r} if m in sys.modules]}}))"
    )
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_import_is_fast_and_light():
    out = imported("from ow_prefect import OpenWeights, AsyncOpenWeights, Jobs, JobFailedError", HEAVY)
    assert out["loaded"] == []
    assert out["s"] < 1.0, f"importing the SDK took {out['s']:.2f} CPU seconds"


def test_the_pods_helpers_do_not_load_the_sdk():
    """docker/entrypoint.sh runs these with `python -m` on every pod start: importing the package must not pull
    in the SDK, the RunPod client or pydantic (they cost ~0.4 s of CPU each time), nor Prefect."""
    helpers = "import ow_prefect.runpod.run_state, ow_prefect.runpod.health, ow_prefect.runpod.agent"
    watched = ["ow_prefect.client", "ow_prefect.runpod.client", "ow_prefect.runpod.models", "pydantic", "prefect"]
    out = imported(helpers, watched)
    assert out["loaded"] == [], out
    import ow_prefect
    import ow_prefect.runpod

    assert ow_prefect.Jobs is ow_prefect.CustomJob and ow_prefect.runpod.Pod.__name__ == "Pod"  # loaded on use
    assert set(ow_prefect.__all__) <= set(dir(ow_prefect)) and set(ow_prefect.runpod.__all__) <= set(
        dir(ow_prefect.runpod)
    )
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ow_prefect.Nope  # noqa: B018


def test_registered_as_prefect_collection():
    names = {ep.name: ep.value for ep in entry_points(group="prefect.collections")}
    assert names.get("ow_prefect") == "ow_prefect.workers"


def test_prefect_loads_the_collection_and_its_workers():
    """Prefect's collection loading imports the worker types and the RunPod credentials block; a flow run's own
    imports (Prefect, then a flow module and through it the SDK) do not."""
    code = (
        "import sys, prefect, flows.custom; print('ow_prefect.workers' in sys.modules); "
        "from prefect.blocks.core import Block; print(Block.get_block_class_from_key('runpod-credentials').__name__); "
        "from prefect.workers.base import BaseWorker; print(BaseWorker.get_worker_class_from_type('runpod').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split()[-3:] == ["False", "RunPodCredentials", "RunPodWorker"], out


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


def test_a_process_without_the_sdk_knows_every_built_in_job_type():
    """A worker or a flow run imports `ow_prefect.jobs` without the SDK (whose import used to register the built-in
    types): a lookup registers them itself."""
    code = "import sys; from ow_prefect.jobs import job_types; "
    code += "print(sorted(job_types()), 'ow_prefect.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    built_in = sorted(name for name, cls in job_types().items() if cls.__module__.startswith("ow_prefect."))
    assert out.strip() == f"{built_in} False"
    assert {"custom", "fine_tuning", "inference", "vllm_api", "inspect_ai", "mmlu_pro", "logprob"} <= set(job_types())

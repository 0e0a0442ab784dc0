"""prefect.yaml against the job types: every built-in deployment exists on both pools, with the entrypoint the
job type hashes, the image its id names, serving ports, and an entrypoint that really imports."""

import pytest
import yaml

from deployments.register import load_deployments, load_flow, pull_steps
from ow_prefect.jobs.api import SERVE_PORT
from ow_prefect.jobs.registry import job_types
from ow_prefect.settings import OWSettings
from tests.conftest import ROOT

SPECS = {spec["name"]: spec for spec in load_deployments()}
LOCAL_SUFFIX = "-local"


def builtin_deployments():
    """(job type, "flow/deployment") for every deployment a built-in job type submits to."""
    import ow_prefect.client  # noqa: F401  (imports every built-in job type)

    pairs = []
    for job_cls in job_types().values():
        names = {job_cls.deployment}
        if job_cls.name == "fine_tuning":
            names |= {f"finetune/{loss}" for loss in ("sft", "dpo", "orpo")}
        pairs += [(job_cls, name) for name in sorted(names)]
    return pairs


@pytest.mark.parametrize(("job_cls", "deployment"), builtin_deployments(), ids=lambda v: getattr(v, "name", v))
def test_every_job_type_has_a_gpu_and_a_local_deployment(job_cls, deployment):
    name = deployment.split("/", 1)[1]
    gpu, local = SPECS[name], SPECS[name + LOCAL_SUFFIX]
    assert gpu["entrypoint"] == local["entrypoint"] == job_cls.entrypoint
    assert gpu.get("parameters") == local.get("parameters")
    assert gpu["work_pool"]["name"] == "gpu" and local["work_pool"]["name"] == "local"
    variables = gpu["work_pool"]["job_variables"]
    assert variables["image"] == OWSettings.model_fields[job_cls.image_setting].default
    assert variables["min_vram_gb"] > 0
    assert (f"{SERVE_PORT}/http" in variables.get("ports", [])) == (job_cls.name == "vllm_api")
    assert gpu["pull"] == pull_steps("runpod", ROOT)  # the image's copy, or OW_POD_CODE_DIR
    assert "pull" not in local  # the project's pull step: this checkout


def test_each_scheduled_deployment_states_its_cron_and_timezone():
    scheduled = {name: spec for name, spec in SPECS.items() if spec.get("schedules")}
    assert len(scheduled) == 4
    for name, spec in scheduled.items():
        for schedule in spec["schedules"]:
            assert f"cron `{schedule['cron']}`" in spec["description"], name
            assert f"timezone {schedule['timezone']}" in spec["description"], name


CPU_ONLY = {"openai"}  # deployments that need no GPU: on the local pool under both names


def test_every_gpu_deployment_has_a_local_variant_and_schedules_match():
    gpu = [name for name, spec in SPECS.items() if spec["work_pool"]["name"] == "gpu"]
    local = [name for name, spec in SPECS.items() if spec["work_pool"]["name"] == "local"]
    assert sorted(name + LOCAL_SUFFIX for name in [*gpu, *CPU_ONLY]) == sorted(set(local) - CPU_ONLY)
    for name in gpu:
        assert SPECS[name].get("schedules") == SPECS[name + LOCAL_SUFFIX].get("schedules")
        assert all(s["active"] is False for s in SPECS[name].get("schedules") or [])


def test_openai_models_go_to_a_deployment_without_a_gpu_under_both_names():
    from ow_prefect.jobs.inference import OPENAI_DEPLOYMENT, InferenceJob

    name = OPENAI_DEPLOYMENT.split("/", 1)[1]
    for spec in (SPECS[name], SPECS[name + LOCAL_SUFFIX]):
        assert spec["entrypoint"] == InferenceJob.entrypoint and spec["work_pool"]["name"] == "local"


@pytest.mark.parametrize("entrypoint", sorted({spec["entrypoint"] for spec in SPECS.values()}))
def test_entrypoint_imports_and_its_flow_has_the_name_job_types_submit_to(entrypoint):
    flow = load_flow(entrypoint)
    submitted_to = {deployment.split("/")[0] for job_cls, deployment in builtin_deployments()}
    assert flow.name in submitted_to
    assert {job_cls.entrypoint for job_cls, d in builtin_deployments() if d.startswith(f"{flow.name}/")} <= {
        spec["entrypoint"] for spec in SPECS.values()
    }


@pytest.mark.parametrize("entrypoint", sorted({spec["entrypoint"] for spec in SPECS.values()}))
def test_every_deployment_but_the_api_offers_force_rerun_in_its_form(entrypoint):
    """A completed job runs again only when asked: the UI's run form shows the checkbox, described."""
    properties = load_flow(entrypoint).parameters.model_dump()["properties"]
    if entrypoint == "flows/vllm_api/flow.py:vllm_api":  # an API never completes: starting it again serves again
        assert "force_rerun" not in properties
        return
    force_rerun = properties["force_rerun"]
    assert force_rerun["type"] == "boolean" and force_rerun["default"] is False
    assert "already completed" in force_rerun["description"] and "history" in force_rerun["description"]


@pytest.mark.parametrize("entrypoint", sorted({spec["entrypoint"] for spec in SPECS.values()}))
def test_the_ui_form_lists_the_job_fields_first_and_the_sdk_envelope_last_with_its_title(entrypoint):
    from flows._runtime import OW_JOB_DESCRIPTION, OW_JOB_TITLE

    properties = load_flow(entrypoint).parameters.model_dump()["properties"]
    envelope = properties.pop("ow_job")
    assert envelope["title"] == OW_JOB_TITLE and envelope["default"] is None
    assert envelope["position"] > max(p["position"] for p in properties.values())
    assert all(p["title"] == name for name, p in properties.items())
    assert envelope["description"] == OW_JOB_DESCRIPTION
    assert all(p.get("description") for p in properties.values()), properties  # every field described


def test_prefect_yaml_is_plain_yaml_with_anchors_resolved():
    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert raw["definitions"]["work_pools"]["gpu_api"] == SPECS["serve"]["work_pool"]


@pytest.mark.usefixtures("worker", "use_server")
def test_deployment_suffix_sends_jobs_to_the_local_variants(monkeypatch):
    from prefect.client.orchestration import get_client

    from ow_prefect import OpenWeights

    monkeypatch.setenv("OW_DEPLOYMENT_SUFFIX", LOCAL_SUFFIX)
    job = OpenWeights().custom.create(entrypoint="echo on the local variant").wait(timeout=180, poll_interval=0.5)
    assert job.status == "completed", job.error
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(job.flow_run_id)
        assert client.read_deployment(run.deployment_id).name == "run-local"


def test_the_presets_are_prefect_yaml_s_and_valid_runpod_job_variables():
    from deployments.presets import job_variables, presets
    from ow_prefect.workers.runpod import runpod_job_variables

    known = presets()
    assert {"gpu_train", "gpu_custom", "gpu_serve", "gpu_api", "local"} <= set(known)
    for preset in known.values():
        if preset["pool"] == "gpu":
            assert runpod_job_variables(**preset["job_variables"]) == preset["job_variables"]
    assert job_variables("gpu_api")["ports"] == ["8000/http"]
    with pytest.raises(KeyError, match="no preset 'gpu_huge'"):
        job_variables("gpu_huge")

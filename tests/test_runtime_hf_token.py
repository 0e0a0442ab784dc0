"""flows/_runtime.py's HF token for gated downloads (provide_hf_token), without a flow run."""

import os
from uuid import uuid4

import pytest

from flows._runtime import JobRun, provide_hf_token
from ow_prefect.jobs.finetune import FineTuneJob


def job_run(deployment_id) -> JobRun:
    from prefect.client.schemas.objects import FlowRun

    flow_run = FlowRun(id=uuid4(), flow_id=uuid4(), name="quiet-otter", deployment_id=deployment_id)
    return JobRun(FineTuneJob, "ftjob-0123456789ab", {}, None, flow_run)


@pytest.fixture
def hf_secret(use_server, monkeypatch):
    from prefect.blocks.system import Secret

    Secret(value="hf_team_token_for_gated_models").save("ow-test-runtime-hf", overwrite=True, _sync=True)
    monkeypatch.setenv("OW_HF_TOKEN_SECRET", "ow-test-runtime-hf")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_a_worker_run_downloads_with_the_teams_token(hf_secret, monkeypatch):
    provide_hf_token(job_run(deployment_id=uuid4()))
    assert os.environ["HF_TOKEN"] == "hf_team_token_for_gated_models"
    monkeypatch.delenv("HF_TOKEN")


def test_a_token_already_set_wins_and_an_embedded_run_leaves_the_environment_alone(hf_secret, monkeypatch):
    provide_hf_token(job_run(deployment_id=None))  # a flow called in the user's own process
    assert "HF_TOKEN" not in os.environ
    monkeypatch.setenv("HF_TOKEN", "hf_the_operators_own")
    provide_hf_token(job_run(deployment_id=uuid4()))
    assert os.environ["HF_TOKEN"] == "hf_the_operators_own"

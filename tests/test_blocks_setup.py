"""`python -m blocks`: block types and documents from the environment and .env, idempotent, secrets never printed;
the S3 block it saves really reaches the (moto) bucket through its endpoint URL."""

import os
import subprocess
import sys

import boto3

from blocks.setup import read_values, register_blocks
from ow_prefect.storage import Storage
from tests.conftest import ROOT

SECRETS = ("rpa_setup_secret_1", "hf_setup_secret_2", "aws_setup_secret_3")


def dotenv(tmp_path, s3_endpoint):
    path = tmp_path / ".env"
    path.write_text(
        "RUNPOD_API_KEY=rpa_setup_secret_1\n"
        "HF_TOKEN=hf_setup_secret_2\n"
        "OW_S3_BUCKET=setup-bucket\n"
        "OW_S3_FOLDER=team\n"
        "OW_STORAGE_BLOCK=s3-bucket/setup-storage\n"
        "AWS_ACCESS_KEY_ID=setup-key-id\n"
        "AWS_SECRET_ACCESS_KEY=aws_setup_secret_3\n"
        f"AWS_ENDPOINT_URL={s3_endpoint}\n"
        "AWS_DEFAULT_REGION=us-east-1\n"
        "OW_RUNPOD_BLOCK=setup-runpod\n"
        "OW_HF_TOKEN_SECRET=setup-hf-token\n"
    )
    return path


def test_command_creates_everything_from_dotenv_and_prints_no_secret(prefect_api, s3_endpoint, tmp_path):
    path = dotenv(tmp_path, s3_endpoint)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "RUNPOD_", "HF_TOKEN"))}
    env |= {"PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "blocks", "--env-file", str(path), "--pool", "gpu-setup"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr
    for line in (
        "runpod-credentials/setup-runpod: created",
        "secret/setup-hf-token: created",
        "aws-credentials/setup-storage-credentials: created",
        "s3-bucket/setup-storage: created",
        "work pool 'gpu-setup' (type runpod): created, default credentials 'setup-runpod'",
    ):
        assert line in result.stdout, result.stdout


def test_again_changes_only_what_changed_and_the_storage_block_works(use_server, s3_endpoint, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect_aws import S3Bucket

    from ow_prefect.runpod.credentials import RunPodCredentials

    path = dotenv(tmp_path, s3_endpoint)
    register_blocks(read_values(path, environ={}), say=lambda line: None)
    lines = []
    outcomes = register_blocks(read_values(path, environ={"HF_TOKEN": "hf_rotated_4"}), say=lines.append)
    assert outcomes == {
        "runpod-credentials/setup-runpod": "unchanged",
        "secret/setup-hf-token": "updated",  # the environment wins over .env
        "aws-credentials/setup-storage-credentials": "unchanged",
        "s3-bucket/setup-storage": "unchanged",
    }
    assert not any(secret in line for line in lines for secret in (*SECRETS, "hf_rotated_4"))
    assert Secret.load("setup-hf-token", _sync=True).get() == "hf_rotated_4"
    assert RunPodCredentials.load("setup-runpod", _sync=True).api_key.get_secret_value() == "rpa_setup_secret_1"
    bucket = S3Bucket.load("setup-storage", _sync=True)
    assert bucket.bucket_folder == "team"
    assert bucket.credentials.aws_client_parameters.endpoint_url == s3_endpoint

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    ).create_bucket(Bucket="setup-bucket")
    monkeypatch.setenv("OW_STORAGE_BLOCK", "s3-bucket/setup-storage")
    storage = Storage.from_settings()
    assert storage.get_bytes(storage.put_bytes(b"through the saved block", "result").id) == b"through the saved block"


def test_nothing_set_creates_nothing(use_server):
    lines = []
    assert register_blocks({}, say=lines.append) == {}
    assert "no documents" in lines[-1]


def test_an_older_pool_gets_the_job_variables_it_lacks_and_keeps_its_values(use_server):
    """A pool made before `max_cost` existed: Prefect would ignore `max_cost` on its runs. Updating the pool adds the
    variables its template lacks and keeps what the pool had set."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from blocks.runpod import ensure_runpod_pool
    from ow_prefect.workers.runpod import RunPodWorker

    old = RunPodWorker.base_job_template(cloud="ANY")
    for name in ("max_cost", "cache_volume_ids", "daily_budget"):
        old["variables"]["properties"].pop(name)
        old["job_configuration"].pop(name, None)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="older-gpu", type="runpod", base_job_template=old), overwrite=True)
        assert ensure_runpod_pool("older-gpu", block_id="7f9ec2d2-6b44-4e3c-9c0e-0d6a3c1d3b55") == "updated"
        template = client.read_work_pool("older-gpu").base_job_template
    assert {"max_cost", "cache_volume_ids", "daily_budget"} <= set(template["variables"]["properties"])
    assert template["job_configuration"]["max_cost"] == "{{ max_cost }}"
    assert template["variables"]["properties"]["cloud"]["default"] == "ANY"

"""Secrets stay secret through a full run on RunPod (fake): a fine-tune that reads S3 storage and pushes to the Hub
(fake), then its adapter served as a temporary API. Every log line, flow-run parameter, event, artifact,
variable, pod name and pod log line is collected and searched for the RunPod key, the HF token, the S3 secret,
the API key and Prefect's auth string. Also: the API refuses a missing or wrong key (tampered storage records:
tests/test_storage.py), and a wrong RunPod key fails the run as an auth error after one request."""

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from ow_prefect.testing.fake_runpod import FakeRunPod
from ow_prefect.testing.servers import prefect_worker
from tests.fake_hub import FakeHub
from tests.runpod_support import AUTH_STRING, WORKER_ENV, assert_clean, deploy, finished, make_pool, wait_for

pytestmark = pytest.mark.slow

RUNPOD_KEY = "rpa_SECRET_runpod_9f8e7d6c5b4a"
HF_TOKEN = "hf_SECRET_token_3c2b1a0f9e8d"
S3_SECRET = "s3_SECRET_access_5d4c3b2a1f0e"
POOL = "ow-test-runpod-security"
SUFFIX = "-security"
STORAGE_BLOCK = "ow-security-storage"
HF_SECRET_BLOCK = "ow-security-hf-token"


@pytest.fixture(scope="module")
def fake():
    with FakeRunPod(api_key=RUNPOD_KEY, boot_seconds=0.3, restart_backoff=0.5, kill_grace=2) as f:
        yield f


@pytest.fixture(scope="module")
def hub():
    with FakeHub(token=HF_TOKEN) as h:
        yield h


def save_secret_blocks(s3_endpoint: str) -> None:
    from prefect.blocks.system import Secret
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id="ow-security-access-id",
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    )
    bucket = f"ow-security-{uuid.uuid4().hex[:8]}"
    credentials.get_s3_client().create_bucket(Bucket=bucket)
    S3Bucket(bucket_name=bucket, bucket_folder="ow", credentials=credentials).save(STORAGE_BLOCK, overwrite=True)
    Secret(value=HF_TOKEN).save(HF_SECRET_BLOCK, overwrite=True)


def everything_recorded(client, fake: FakeRunPod, since: datetime, worker_log) -> dict[str, str]:
    """What a user, an admin or RunPod's console can read after the run, by where it is kept."""
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.events.filters import EventFilter, EventOccurredFilter

    logs, offset = [], 0
    while page := client.read_logs(
        log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=since)), limit=200, offset=offset
    ):
        logs += [log.message for log in page]
        offset += len(page)
    events, page = [], client.read_events(filter=EventFilter(occurred=EventOccurredFilter(since=since)), limit=50)
    while True:
        events += [e.model_dump_json() for e in page.events]
        if not page.next_page:
            break
        page = client.read_events_page(page.next_page)
    runs = client.read_flow_runs()
    return {
        "logs": "\n".join(logs),
        "flow-run parameters": "\n".join(json.dumps(run.parameters, default=str) for run in runs),
        "flow-run states": "\n".join(f"{run.state.name}: {run.state.message}" for run in runs if run.state),
        "events": "\n".join(events),
        "artifacts": "\n".join(f"{a.key} {a.description} {a.data}" for a in client.read_artifacts()),
        "variables": "\n".join(f"{v.name} {v.value}" for v in client.read_variables()),
        "pod names": "\n".join(pod.name for pod in fake.pods.values()),
        "pod logs": "\n".join(entry.line for pod in fake.pods.values() for entry in pod.logs),
        "worker log": worker_log.read_text(),
    }


def test_no_secret_reaches_logs_parameters_events_artifacts_or_pods(
    fake, hub, prefect_client, use_server, s3_endpoint, tiny_model, tmp_path, monkeypatch
):
    from ow_prefect import OpenWeights
    from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

    since = datetime.now(UTC) - timedelta(seconds=5)
    save_secret_blocks(s3_endpoint)
    monkeypatch.setenv("OW_STORAGE_BLOCK", f"s3-bucket/{STORAGE_BLOCK}")
    monkeypatch.setenv("OW_DEPLOYMENT_SUFFIX", SUFFIX)
    monkeypatch.setenv("OW_TRAIN_BACKEND", "transformers")
    pod_env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}  # the fake Hub instead of huggingface.co
    make_pool(prefect_client, fake, POOL)
    deploy(prefect_client, POOL, f"sft{SUFFIX}", entrypoint="flows/finetune/flow.py:finetune", env=pod_env)
    deploy(prefect_client, POOL, f"serve{SUFFIX}", entrypoint="flows/vllm_api/flow.py:vllm_api")
    worker_env = {**WORKER_ENV, "OW_STORAGE_BLOCK": f"s3-bucket/{STORAGE_BLOCK}", "OW_HF_TOKEN_SECRET": HF_SECRET_BLOCK}
    worker_log = tmp_path / "worker.log"
    ow = OpenWeights()
    with prefect_worker(use_server, POOL, "runpod", worker_env, worker_log):
        data = ow.files.upload(write_jsonl(sample_conversations(64), tmp_path / "train.jsonl"), "conversations")
        job = ow.fine_tuning.create(
            model=str(tiny_model), training_file=data.id, max_steps=4, merge_before_push=False, learning_rate=1e-3
        )
        done = wait_for(prefect_client, job.flow_run_id, finished, timeout=300)
        assert done.state.is_completed(), f"{done.state}\n{worker_log.read_text()[-3000:]}"
        job = ow.jobs.retrieve(job.id)
        pushed = hub.repos[job.outputs["hub_model_id"]]
        assert "adapter_model.safetensors" in pushed and hub.private[job.outputs["hub_model_id"]]
        assert set(hub.tokens) == {HF_TOKEN}, "the pod used the HF token (from its Secret block) and only it"

        api = ow.api.deploy(job.id, max_model_len=256, max_num_seqs=2, keep_alive=60)
        with api as client:
            api_key = api.api_key
            reply = client.chat.completions.create(
                model=job.id, messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert reply.usage.completion_tokens >= 1
            for wrong in ("", "sk-wrong-key"):
                with pytest.raises(openai.AuthenticationError):
                    openai.OpenAI(base_url=api.base_url, api_key=wrong or "x", max_retries=0).models.list()
            bare = httpx.post(f"{api.base_url}/chat/completions", json={"model": job.id, "messages": []}, timeout=30)
            assert bare.status_code == 401
        assert api_key and len(api_key) >= 32
        assert_clean(fake, timeout=60)

    time.sleep(3)  # logs and events reach the server in batches
    recorded = everything_recorded(prefect_client, fake, since, worker_log)
    assert job.id in recorded["flow-run parameters"] and "Pod " in recorded["worker log"]  # the net is not empty
    assert "train loss" in recorded["logs"] and "ow.pod.terminated" in recorded["events"]
    secrets = {"RunPod key": RUNPOD_KEY, "HF token": HF_TOKEN, "S3 secret": S3_SECRET, "API key": api_key}
    secrets["Prefect auth string"] = AUTH_STRING
    leaks = [
        f"{name} in {where}" for name, value in secrets.items() for where, text in recorded.items() if value in text
    ]
    assert not leaks, leaks


def test_a_wrong_runpod_key_fails_the_run_as_an_auth_error_without_retrying(prefect_client, prefect_api, tmp_path):
    with FakeRunPod(api_key="rpa_the_right_key") as fake:
        make_pool(prefect_client, fake, "ow-test-runpod-wrong-key")  # saves the fake's key...
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from ow_prefect.runpod.credentials import RunPodCredentials

        with temporary_settings(updates={PREFECT_API_URL: prefect_api}):  # ...then a wrong one over it
            RunPodCredentials(api_key="rpa_SECRET_wrong_key", api_url=fake.url).save(
                "ow-test-runpod-wrong-key", overwrite=True, _sync=True
            )
        deployment_id = deploy(prefect_client, "ow-test-runpod-wrong-key", "wrong-key")
        with prefect_worker(prefect_api, "ow-test-runpod-wrong-key", "runpod", WORKER_ENV, tmp_path / "w.log"):
            flow_run = prefect_client.create_flow_run_from_deployment(deployment_id)
            done = wait_for(prefect_client, flow_run.id, finished, timeout=90)
        catalog = [path for method, path, _ in fake.requests if path.endswith("/catalog/gpus")]
        creates = [path for method, path, _ in fake.requests if method == "POST"]
        assert len(catalog) == 1 and not creates, fake.requests  # a 401 is final: no retry, no pod
        assert not fake.pods
    assert (done.state.is_crashed() or done.state.is_failed()) and "RunPod refused the API key" in done.state.message
    assert "rpa_SECRET_wrong_key" not in done.state.message + (tmp_path / "w.log").read_text()

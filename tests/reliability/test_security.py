"""Security end to end on RunPod (fake), with the secret scan over everything a run leaves behind.

One scenario, so that one API start and one fine-tune serve every check:
- a fine-tune of a **gated** model on the fake Hub (the tiny model, which only the team's HF token can download)
  reading S3 storage and pushing its adapter back to the Hub; a batch inference and a temporary API load the
  same gated base (with the adapter) — the token reaches each pod's downloads through its Secret block only;
- the API is probed on **every route vLLM registers** (read from vLLM's own app: tests/vllm_routes.py) without a
  key, with a wrong key and with the right one: only `/health` and keyed OpenAI routes under `/v1` get through
  the gateway; after the API ends, its key no longer exists;
- a custom job on a pod prints its whole environment: no credential of the pod is in it;
- then every log line, flow-run parameter and state, event, artifact, variable, pod name and pod log line is
  searched for the RunPod key, the HF token, the S3 secret, the API key and Prefect's auth string.
Also: a wrong RunPod key fails the run as an auth error after one request. Tampered storage records:
tests/test_storage.py; the gateway's own behaviour: tests/test_gateway.py."""

import json
import re
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest

from flows._gateway import REFUSED_HEADER, forwarded
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
GATED_MODEL = "ow-tester/tiny-gated"
ROOT = Path(__file__).resolve().parents[2]


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


def vllm_routes(model: Path) -> subprocess.Popen:
    """Every route vLLM registers, read from vLLM's own app by its interpreter (started now, read later)."""
    from ow_prefect.settings import get_settings

    script = [str(get_settings().vllm_interpreter), str(ROOT / "tests" / "vllm_routes.py"), "--model", str(model)]
    return subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def probe_every_route(base_url: str, routes: list[tuple[str, list[str]]], key: str, model: str) -> dict[str, int]:
    """Each route and method without a key, with a wrong one and with `key`: only `/health` and keyed OpenAI
    routes reach vLLM; everything else is the gateway's own 401 (under /v1) or 404. Returns what each keyed
    forwarded request answered."""
    root = base_url.removesuffix("/v1")
    bodies = {
        "/v1/chat/completions": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/v1/completions": {"model": model, "prompt": "hi", "max_tokens": 2},
    }
    reached: dict[str, int] = {}
    for path, methods in routes:
        concrete = path.replace("{", "").replace("}", "")  # /v1/responses/{response_id} -> /v1/responses/response_id
        for method in methods:
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Bearer {key}"}):
                keyed = key in headers.get("Authorization", "")
                answer = httpx.request(
                    method, f"{root}{concrete}", headers=headers, json=bodies.get(path, {}), timeout=120
                )
                where = f"{method} {path} {'with the key' if keyed else headers or 'without a key'}"
                if path == "/health" and method == "GET":
                    assert answer.status_code == 200, where
                elif keyed and forwarded(method, concrete):
                    assert answer.status_code != 401 and not _refused_by_gateway(answer), (where, answer.text)
                    reached[f"{method} {path}"] = answer.status_code
                else:
                    expected = 401 if concrete.startswith("/v1/") and not keyed else 404
                    assert answer.status_code == expected, (where, answer.status_code, answer.text[:200])
                    assert _refused_by_gateway(answer), (where, answer.text[:200])
    return reached


def _refused_by_gateway(answer: httpx.Response) -> bool:
    return answer.headers.get(REFUSED_HEADER) == "gateway"


@pytest.mark.timeout(1500)  # four runs on pods (three at once at most), two vLLM starts: minutes on 2 busy cores
def test_gated_models_routes_keys_and_environments_and_no_secret_anywhere(
    fake, hub, prefect_client, use_server, s3_endpoint, tiny_model, tmp_path, monkeypatch
):
    from prefect.blocks.system import Secret

    from ow_prefect import OpenWeights
    from ow_prefect.jobs.api import key_secret
    from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

    since = datetime.now(UTC) - timedelta(seconds=5)
    routes_reader = vllm_routes(tiny_model)
    save_secret_blocks(s3_endpoint)
    hub.serve(GATED_MODEL, tiny_model)  # only HF_TOKEN downloads it
    monkeypatch.setenv("OW_STORAGE_BLOCK", f"s3-bucket/{STORAGE_BLOCK}")
    monkeypatch.setenv("OW_DEPLOYMENT_SUFFIX", SUFFIX)
    # What the pods need besides the worker's env: the fake Hub instead of huggingface.co, the CPU backend.
    pod_env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "OW_TRAIN_BACKEND": "transformers"}
    make_pool(prefect_client, fake, POOL)
    for name, entrypoint in (
        ("sft", "flows/finetune/flow.py:finetune"),
        ("batch", "flows/inference/flow.py:inference"),
        ("serve", "flows/vllm_api/flow.py:vllm_api"),
        ("run", "flows/custom.py:custom_run"),
    ):
        deploy(prefect_client, POOL, f"{name}{SUFFIX}", entrypoint=entrypoint, env=pod_env)
    worker_env = {**WORKER_ENV, "OW_STORAGE_BLOCK": f"s3-bucket/{STORAGE_BLOCK}", "OW_HF_TOKEN_SECRET": HF_SECRET_BLOCK}
    worker_log = tmp_path / "worker.log"
    ow = OpenWeights()
    with prefect_worker(use_server, POOL, "runpod", worker_env, worker_log):
        env_job = ow.custom.create(entrypoint="env | sort")  # on a pod of its own while the fine-tune trains
        data = ow.files.upload(write_jsonl(sample_conversations(64), tmp_path / "train.jsonl"), "conversations")
        job = ow.fine_tuning.create(
            model=GATED_MODEL, training_file=data.id, max_steps=4, merge_before_push=False, learning_rate=1e-3
        )
        done = wait_for(prefect_client, job.flow_run_id, finished, timeout=300)
        assert done.state.is_completed(), f"{done.state}\n{worker_log.read_text()[-3000:]}"
        job = ow.jobs.retrieve(job.id)
        assert job.outputs["model"]["base"] == GATED_MODEL
        pushed = hub.repos[job.outputs["hub_model_id"]]
        assert "adapter_model.safetensors" in pushed and hub.private[job.outputs["hub_model_id"]]

        prompts = ow.files.upload(write_jsonl(sample_conversations(3), tmp_path / "prompts.jsonl"), "conversations")
        # the batch job runs on its pod while the API below starts on another
        batch = ow.inference.create(model=job.id, input_file_id=prompts.id, max_tokens=3, max_model_len=256)
        routes = [tuple(route) for route in json.loads(routes_reader.communicate(timeout=300)[0])]
        assert ("/invocations", ["POST"]) in routes and ("/v1/chat/completions", ["POST"]) in routes
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
            reached = probe_every_route(api.base_url, routes, api_key, job.id)
            core = ("GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions")
            assert {reached[route] for route in core} == {200}, reached
        assert api_key and len(api_key) >= 32
        with pytest.raises(ValueError):  # the run deleted its key when it ended
            Secret.load(key_secret(api.job_id), _sync=True)
        for submitted in (batch, env_job):
            ended = wait_for(prefect_client, submitted.flow_run_id, finished, timeout=300)
            assert ended.state.is_completed(), f"{ended.state}\n{worker_log.read_text()[-3000:]}"
        rows = [
            json.loads(line)
            for line in ow.files.content(ow.jobs.retrieve(batch.id).outputs["result_file"]).splitlines()
        ]
        assert len(rows) == 3 and all(row["completion"] is not None for row in rows)
        printed = ow.jobs.retrieve(env_job.id).logs()
        variables = set(re.findall(r"^\S+ ([A-Za-z_][A-Za-z0-9_]*)=", printed, re.MULTILINE))  # time NAME=value
        assert {"PATH", "OW_JOB_ID", "RUNPOD_POD_ID"} <= variables, printed  # the command printed its environment
        assert not variables & {"RUNPOD_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "HF_TOKEN"}, variables
        assert not {v for v in variables if v.startswith("AWS_")}, variables
        assert_clean(fake, timeout=60)

    assert set(hub.tokens) == {HF_TOKEN}, "every pod used the HF token (from its Secret block) and only it"
    weights = [repo for repo, path in hub.downloads if path == "model.safetensors"]
    assert set(weights) == {GATED_MODEL} and len(weights) >= 3, "fine-tune, batch and API each downloaded it"

    time.sleep(3)  # logs and events reach the server in batches
    recorded = everything_recorded(prefect_client, fake, since, worker_log)
    assert job.id in recorded["flow-run parameters"] and "Pod " in recorded["worker log"]  # the net is not empty
    assert "train loss" in recorded["logs"] and "ow.pod.terminated" in recorded["events"]
    assert "RUNPOD_POD_ID=" in recorded["logs"], "the custom job's environment is in the scan"
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

"""Storage (S3: moto behind a proxy the test takes down) is unreachable for a while: uploads wait and retry instead
of losing what a job computed — in the SDK and in a run on a RunPod pod."""

import logging
import threading
import time
import uuid

import pytest

from ow_prefect.errors import StorageError
from ow_prefect.storage import Storage, backend_for_block
from ow_prefect.testing.servers import FlakyProxy, prefect_worker
from tests.runpod_support import (
    WORKER_ENV,
    assert_clean,
    assert_outputs_intact,
    deploy,
    finished,
    make_pool,
    run_logs,
    wait_for,
)

BLOCK = "ow-rel-outage"
POOL = "ow-test-runpod-storage-outage"


@pytest.fixture
def proxy(s3_endpoint):
    with FlakyProxy(s3_endpoint.removeprefix("http://")) as p:
        yield p


def bucket_block(endpoint: str, bucket: str):
    """An S3Bucket block on moto, with no retry config of its own: ow_prefect sizes botocore's retries."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
    )
    credentials.get_s3_client().create_bucket(Bucket=bucket)
    return S3Bucket(bucket_name=bucket, bucket_folder="ow", credentials=credentials)


def up_after(proxy: FlakyProxy, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), proxy.up()), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def storage_warnings():
    """What ow_prefect.storage logs (outside a flow run; Prefect's logging set-up keeps it from caplog)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("ow_prefect.storage")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_an_upload_waits_for_storage_to_come_back(proxy, tmp_path, storage_warnings):
    storage = Storage(backend_for_block(bucket_block(proxy.url, f"ow-{uuid.uuid4().hex[:8]}")))
    big = tmp_path / "weights.bin"
    big.write_bytes(uuid.uuid4().bytes * 200_000)  # 3.2 MB
    proxy.down()
    started = time.monotonic()
    up_after(proxy, 4)
    record = storage.put_path(big, "adapter")
    assert time.monotonic() - started >= 4
    assert storage.get_bytes(record.id) == big.read_bytes()
    assert storage_warnings and all("unavailable during" in line for line in storage_warnings)
    attempts = [int(line.split("attempt ")[1].split(" of")[0]) for line in storage_warnings]
    assert attempts[:3] == [2, 3, 4][: len(attempts)], storage_warnings  # botocore's retries, each one logged


def test_an_outage_longer_than_the_retry_budget_raises_instead_of_hanging(proxy, monkeypatch):
    monkeypatch.setenv("OW_STORAGE_RETRY_SECONDS", "3")
    storage = Storage(backend_for_block(bucket_block(proxy.url, f"ow-{uuid.uuid4().hex[:8]}")))
    proxy.down()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"unavailable for \d+ s during head .*OW_STORAGE_RETRY_SECONDS"):
        storage.put_bytes(b"never stored", "result")
    assert time.monotonic() - started < 60


def test_a_missing_bucket_is_not_retried(s3_endpoint, monkeypatch):
    from prefect_aws import S3Bucket

    block = bucket_block(s3_endpoint, f"ow-{uuid.uuid4().hex[:8]}")
    missing = S3Bucket(bucket_name="ow-no-such-bucket", credentials=block.credentials)
    started = time.monotonic()
    with pytest.raises(Exception, match="NoSuchBucket"):
        Storage(backend_for_block(missing)).put_bytes(b"x", "result")
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_a_run_on_a_pod_keeps_its_output_through_a_storage_outage(
    proxy, fake, prefect_client, prefect_api, tmp_path, monkeypatch
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        bucket_block(proxy.url, f"ow-{uuid.uuid4().hex[:8]}").save(BLOCK, overwrite=True, _sync=True)
    env = {**WORKER_ENV, "OW_STORAGE_BLOCK": f"s3-bucket/{BLOCK}"}
    make_pool(prefect_client, fake, POOL)
    deployment_id = deploy(prefect_client, POOL, "storage-outage")
    output = f"output-{uuid.uuid4()}"
    with prefect_worker(prefect_api, POOL, "runpod", env, tmp_path / "worker.log"):
        flow_run = prefect_client.create_flow_run_from_deployment(
            deployment_id, parameters={"seconds": 2, "payload": output}
        )
        wait_for(prefect_client, flow_run.id, lambda fr: fr.state.is_running(), timeout=120)
        proxy.down()  # before the flow stores its output, 2 s after it started
        time.sleep(8)
        assert not client_state(prefect_client, flow_run.id).is_final(), "the run waits for storage"
        proxy.up()
        done = wait_for(prefect_client, flow_run.id, finished, timeout=120)
        assert done.state.is_completed(), done.state
        assert_clean(fake)
    assert "unavailable during" in run_logs(prefect_client, flow_run.id)  # the retries are in the run's logs
    monkeypatch.setenv("OW_STORAGE_BLOCK", f"s3-bucket/{BLOCK}")
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        assert_outputs_intact({flow_run.id: output})


def client_state(prefect_client, flow_run_id):
    return prefect_client.read_flow_run(flow_run_id).state


@pytest.mark.parametrize(
    ("code", "status", "retried"),
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("ServiceUnavailable", 503, True),
        ("NotImplemented", 501, False),
        ("AccessDenied", 403, False),
        ("NoSuchBucket", 404, False),
    ],
)
def test_which_s3_answers_are_retried(code, status, retried):
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    from ow_prefect.storage import _transient

    error = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    assert _transient(error) is retried
    try:  # upload_file wraps the part's error, raising while handling it
        try:
            raise error
        except ClientError:
            raise S3UploadFailedError(f"Failed to upload: {error}")  # noqa: B904
    except S3UploadFailedError as wrapped:
        assert _transient(wrapped) is retried

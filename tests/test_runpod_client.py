"""The RunPod v2 client against the project's fake RunPod server (real HTTP on loopback, real pod processes)."""

import asyncio

import pytest

from ow_prefect.runpod import (
    AsyncRunPodClient,
    RunPodAuthError,
    RunPodConflict,
    RunPodInvalidSpec,
    RunPodNoCapacity,
    RunPodNotFound,
    RunPodPaymentRequired,
    RunPodRateLimited,
    RunPodServerError,
    RunPodUnreachable,
)
from ow_prefect.runpod.errors import translate
from ow_prefect.testing.fake_runpod import FakeRunPod

GPU = "NVIDIA GeForce RTX 4090"


def pod_body(name="ow-test-pod", command="sleep 30", **extra):
    return {
        "name": name,
        "image": "ow-prefect-train:0.1",
        "gpu": {"id": GPU, "count": 1},
        "cloud": "SECURE",
        "args": command,
        "env": {"HELLO": "world"},
        **extra,
    }


@pytest.fixture
def fake():
    with FakeRunPod(api_key="test-key") as fake:
        yield fake


@pytest.fixture
async def runpod(fake):
    async with AsyncRunPodClient("test-key", base_url=fake.url, backoff_s=0.01) as client:
        yield client


class TestErrorTranslation:
    CAPACITY = "There are no longer any instances available with the requested specifications. Please refresh."

    @pytest.mark.parametrize(
        "status,body,kind",
        [
            (401, {"detail": "bad key"}, RunPodAuthError),
            (403, {"detail": "forbidden"}, RunPodAuthError),
            (402, {"detail": "balance too low"}, RunPodPaymentRequired),
            (400, {"detail": CAPACITY}, RunPodNoCapacity),
            (400, {"detail": "gpu.count must be >= 1"}, RunPodInvalidSpec),
            (422, {"detail": "unknown field 'gpuTypeId'"}, RunPodInvalidSpec),
            (404, {"detail": "pod not found"}, RunPodNotFound),
            (409, {"detail": "cannot stop a terminated pod"}, RunPodConflict),
            (429, {"detail": "slow down"}, RunPodRateLimited),
            (500, "Internal Server Error", RunPodServerError),
            (503, {"title": "unavailable"}, RunPodServerError),
        ],
    )
    def test_status_to_exception(self, status, body, kind):
        error = translate(status, body, method="POST", path="/pods", retry_after="7")
        assert type(error) is kind and error.status == status
        assert str(body if isinstance(body, str) else next(iter(body.values()))) in str(error)

    def test_retry_policy(self):
        retryable = {k for k in (RunPodRateLimited, RunPodServerError, RunPodUnreachable) if k.retryable}
        never = [
            k for k in (RunPodAuthError, RunPodPaymentRequired, RunPodInvalidSpec, RunPodNoCapacity) if k.retryable
        ]
        assert len(retryable) == 3 and never == []
        assert translate(429, {}, method="GET", path="/pods", retry_after="7").retry_after == 7.0

    def test_the_key_never_shows(self):
        assert "secret-key" not in repr(AsyncRunPodClient("secret-key"))


def test_clients_share_one_tls_context(monkeypatch):
    """The worker opens a client per run and per reconciler pass: loading the CA bundle for each (~30 ms of CPU)
    was most of an idle worker's CPU. Clients reuse the process's context, loaded at most once."""
    import ssl

    loads = []
    real = ssl.SSLContext.load_verify_locations
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", lambda *a, **k: loads.append(1) or real(*a, **k))
    clients = [AsyncRunPodClient("k") for _ in range(5)]
    assert len(loads) <= 1
    assert len({id(client._http._transport._pool._ssl_context) for client in clients}) == 1


async def test_create_get_list_delete(runpod, fake):
    pod = await runpod.create_pod(pod_body())
    assert pod.name == "ow-test-pod" and pod.status == "RUNNING" and pod.gpu.id == GPU
    assert (await runpod.get_pod(pod.id)).env == {"HELLO": "world"}
    assert [p.id for p in await runpod.find_pods("ow-test-")] == [pod.id]
    assert await runpod.delete_pod(pod.id) is True
    assert await runpod.delete_pod(pod.id) is False
    with pytest.raises(RunPodNotFound):
        await runpod.get_pod(pod.id)


async def test_list_follows_pagination():
    with FakeRunPod(api_key="test-key", page_size=2) as fake:
        fake.set_stock(GPU, 10, cloud="SECURE")
        async with AsyncRunPodClient("test-key", base_url=fake.url) as runpod:
            created = [await runpod.create_pod(pod_body(name=f"ow-page-{i}", command="sleep 30")) for i in range(5)]
            assert sorted(p.id for p in await runpod.list_pods()) == sorted(p.id for p in created)


async def test_wrong_key_is_not_retried(fake):
    async with AsyncRunPodClient("wrong", base_url=fake.url, backoff_s=0.01) as runpod:
        with pytest.raises(RunPodAuthError):
            await runpod.list_pods()
    assert len([r for r in fake.requests if r[0] == "GET"]) == 1


async def test_unknown_field_is_an_invalid_spec_naming_it(runpod):
    with pytest.raises(RunPodInvalidSpec, match="gpuTypeId"):
        await runpod.create_pod(pod_body(gpuTypeId=GPU))


async def test_capacity_is_raised_at_once_for_the_caller_to_try_elsewhere(runpod, fake):
    fake.set_stock(GPU, 0, cloud="SECURE")
    with pytest.raises(RunPodNoCapacity, match="no longer any instances"):
        await runpod.create_pod(pod_body())
    assert len([r for r in fake.requests if r[0] == "POST"]) == 1


async def test_429_waits_for_retry_after_and_5xx_backs_off(runpod, fake):
    fake.inject("GET", r"/pods$", status=429, times=1, retry_after=1)
    fake.inject("GET", r"/pods/", status=503, times=2)
    started = asyncio.get_running_loop().time()
    assert await runpod.list_pods() == []
    assert asyncio.get_running_loop().time() - started >= 1.0
    pod = await runpod.create_pod(pod_body())
    assert (await runpod.get_pod(pod.id)).id == pod.id


async def test_a_lost_create_response_never_makes_a_second_pod(runpod, fake):
    fake.inject("POST", r"/pods$", lose_response=True, times=1)
    pod = await runpod.create_pod(pod_body(name="ow-lost-response"))
    assert pod.name == "ow-lost-response"
    assert [p.name for p in await runpod.list_pods()] == ["ow-lost-response"]


async def test_a_failed_create_with_no_pod_behind_it_is_tried_again(runpod, fake):
    fake.inject("POST", r"/pods$", status=500, times=1)
    pod = await runpod.create_pod(pod_body(name="ow-after-500"))
    assert [p.id for p in await runpod.list_pods()] == [pod.id]


async def test_action_conflict(runpod):
    pod = await runpod.create_pod(pod_body())
    await runpod.delete_pod(pod.id)
    with pytest.raises((RunPodConflict, RunPodNotFound)):
        await runpod.pod_action(pod.id, "stop")


async def test_logs_stream_the_commands_output(runpod):
    pod = await runpod.create_pod(pod_body(command="echo first line; echo second line; sleep 30"))
    lines = []
    for _ in range(50):
        lines = [event.line async for event in runpod.stream_logs(pod.id, tail=100)]
        if "second line" in lines:
            break
        await asyncio.sleep(0.2)
    assert lines[:2] == ["first line", "second line"]


async def test_gpu_catalog_with_prices_and_availability(runpod, fake):
    gpus = {g.id: g for g in await runpod.gpu_types(count=1)}
    assert GPU in gpus and gpus[GPU].memory == 24 and gpus[GPU].price_in("SECURE") > 0
    assert gpus[GPU].availability in ("LOW", "MEDIUM", "HIGH")
    requests_before = len(fake.requests)
    await runpod.gpu_types(count=1)
    assert len(fake.requests) == requests_before, "the catalog is cached briefly"


async def test_a_broken_log_stream_is_a_typed_error():
    async with AsyncRunPodClient("test-key", base_url="http://127.0.0.1:9") as runpod:  # nothing listens there
        with pytest.raises(RunPodUnreachable, match="log stream of pod p1 broke"):
            [line async for line in runpod.stream_logs("p1")]


async def test_retry_after_is_honoured_for_a_create_too(runpod, fake):
    fake.inject("POST", r"/pods$", status=429, times=1, retry_after=1)
    started = asyncio.get_running_loop().time()
    pod = await runpod.create_pod(pod_body(name="ow-after-429"))
    assert asyncio.get_running_loop().time() - started >= 1.0
    assert [p.id for p in await runpod.list_pods()] == [pod.id]

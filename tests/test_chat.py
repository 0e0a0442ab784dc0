"""The chat client against tests/fake_openai.py (a FAKE OpenAI server: OpenAI has no local stand-in) for
routing, retries, ordering, concurrency and the cache; test_chat_vllm.py covers real vLLM servers."""

import json

import openai
import pytest
from openai.types.chat import ChatCompletion

from ow_prefect import AsyncOpenWeights, OpenWeights
from ow_prefect.chat import ChatFailure
from ow_prefect.settings import OWSettings
from tests.fake_openai import FakeOpenAI

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def fake(monkeypatch):
    with FakeOpenAI() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
        monkeypatch.setenv("OW_OPENAI_CONCURRENCY", "8")
        yield server


@pytest.fixture
def ow(tmp_path):
    client = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    client.chat.settings.backoff_s = 0.01  # quick back-off for the tests
    yield client
    client.chat.close()


def sent(fake, **request):
    """How many times the fake received exactly this request body."""
    return fake.requests[json.dumps(request, sort_keys=True)]


def test_openai_models_get_openai_types(fake, ow):
    reply = ow.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=50)
    assert isinstance(reply, ChatCompletion) and reply.choices[0].message.content == "ereht olleh"
    prefixed = ow.chat.completions.create(model="openai/my-model", messages=HELLO, max_tokens=50)
    assert prefixed.model == "my-model"  # the prefix only routes


def test_429_with_retry_after_5xx_and_dropped_connections_are_retried(fake, ow):
    fake.fail(429, times=2, retry_after=0.2)
    ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=7)
    assert sent(fake, model="gpt-4o", messages=HELLO, max_tokens=7) == 3
    fake.fail(503, times=3)
    ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=8)
    assert sent(fake, model="gpt-4o", messages=HELLO, max_tokens=8) == 4
    fake.drop(1)
    ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=9)
    assert sent(fake, model="gpt-4o", messages=HELLO, max_tokens=9) == 2
    fake.fail(400)
    with pytest.raises(openai.BadRequestError):
        ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=10)
    assert sent(fake, model="gpt-4o", messages=HELLO, max_tokens=10) == 1  # never retried


def test_slow_servers_time_out_by_max_tokens_and_are_retried(fake, ow):
    ow.chat.settings.base_timeout_s, ow.chat.settings.timeout_per_token_s = 0.2, 0.01
    fake.faults.delay = 0.5
    with pytest.raises(openai.APITimeoutError):  # 0.2 + 5 × 0.01 s < 0.5 s, every attempt
        ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=5)
    assert ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=50)  # 0.7 s is enough


def test_seeded_requests_are_cached_per_request_and_weights(fake, ow, tmp_path):
    request = {"model": "gpt-4o", "messages": HELLO, "max_tokens": 5, "seed": 1, "temperature": 0.7}
    first = ow.chat.completions.create(**request)
    again = ow.chat.completions.create(**request)
    assert again == first and sent(fake, **request) == 1  # a hit touches no network
    ow.chat.completions.create(**{**request, "temperature": 0.8})
    ow.chat.completions.create(**{**request, "model": "gpt-4.1"})
    ow.chat.completions.create(**{**request, "seed": 2})
    assert len(fake.requests) == 4  # any change is a miss
    unseeded = {k: v for k, v in request.items() if k != "seed"}
    ow.chat.completions.create(**unseeded)
    ow.chat.completions.create(**unseeded)
    assert sent(fake, **unseeded) == 2  # no seed, no cache
    # a fresh client on the same directory hits; a corrupt entry is a miss, not a crash
    other = OpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    assert other.chat.completions.create(**request) == first
    for key in list(other.chat.engine.cache._cache.iterkeys()):
        other.chat.engine.cache._cache.set(key, "{not json")
    refetched = other.chat.completions.create(**request)  # asked again: same text, maybe another `created`
    assert refetched.choices[0].message.content == first.choices[0].message.content and sent(fake, **request) == 2
    other.chat.close()


def test_batch_keeps_order_bounds_concurrency_and_reports_failures_per_item(fake, ow):
    fake.faults.delay = 0.02
    requests = [
        {"model": "gpt-4o", "messages": [{"role": "user", "content": f"n{i}"}], "max_tokens": 9} for i in range(120)
    ]
    requests[17] = {"model": "gpt-4o"}  # no messages: this one fails, the others do not
    results = ow.chat.completions.batch(requests, progress=False)
    assert len(results) == 120 and isinstance(results[17], ChatFailure) and results[17].index == 17
    assert [r.choices[0].message.content for i, r in enumerate(results) if i != 17] == [
        f"n{i}"[::-1] for i in range(120) if i != 17
    ]
    assert fake.peak_in_flight <= 8  # OW_OPENAI_CONCURRENCY


def test_identical_seeded_requests_in_one_batch_are_paid_once(fake, ow, tmp_path):
    fake.faults.delay = 0.2
    request = {"model": "gpt-4o", "messages": HELLO, "max_tokens": 3, "seed": 5}
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(request) + "\n" for _ in range(20)))
    results = ow.chat.completions.batch(str(path), progress=False)  # a JSONL file works too
    assert len(results) == 20 and len({r.id for r in results}) == 1
    assert sent(fake, **request) == 1


async def test_the_async_client_creates_and_batches(fake, tmp_path):
    ow = AsyncOpenWeights(settings=OWSettings(chat_cache_dir=tmp_path / "cache"))
    reply = await ow.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=50)
    assert reply.choices[0].message.content == "ereht olleh"
    results = await ow.chat.completions.batch([{"model": "gpt-4o", "messages": HELLO}] * 3, progress=False)
    assert len(results) == 3
    await ow.chat.aclose()


def test_a_missing_openai_key_says_how_to_set_it(monkeypatch, ow):
    from ow_prefect import ConfigurationError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OW_OPENAI_KEY_SECRET", "no-such-secret-block")
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        ow.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_a_prefect_outage_is_not_reported_as_a_missing_openai_key(monkeypatch):
    """The key's Secret block cannot be read because the Prefect API is down (nothing listens at its URL): the
    error says so, instead of "there is no key"."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect import ConfigurationError, OWError
    from ow_prefect.chat.routing import openai_endpoint

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    down = temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"})
    with down, pytest.raises(OWError, match="reading the Secret block 'openai-api-key' failed .*Prefect API") as raised:
        openai_endpoint("gpt-4o")
    assert not isinstance(raised.value, ConfigurationError) and "no key" not in str(raised.value)


def test_batch_can_hand_answers_over_as_they_come(fake, ow):
    seen = {}
    count = ow.chat.completions.batch(
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": str(i)}]} for i in range(50)),
        progress=False,
        on_result=lambda index, answer: seen.__setitem__(index, answer.choices[0].message.content),
    )
    assert count == 50 and seen == {i: str(i)[::-1] for i in range(50)}


class SlowDeploy:
    """`ow.api` for deploy-on-demand whose `deploy` blocks like the real one (it submits a job through Prefect's
    API) and whose server is the fake: a stand-in, because a real TemporaryApi needs vLLM (test_chat_vllm.py
    deploys one for real)."""

    def __init__(self, fake, seconds: float, error: BaseException | None = None):
        self.fake, self.seconds, self.error = fake, seconds, error
        self.deployed: list[str] = []

    def deploy(self, base, adapters, **params):
        import time
        from types import SimpleNamespace

        time.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        self.deployed.append(base)
        return SimpleNamespace(
            up=lambda: None,
            down=lambda: None,
            base_url=self.fake.url,
            api_key=self.fake.api_key,
            validated=SimpleNamespace(max_num_seqs=4),
        )


def engine_with(api: SlowDeploy, window_s: float = 0.05):
    from types import SimpleNamespace

    from ow_prefect.chat.engine import ChatEngine, ChatSettings

    return ChatEngine(SimpleNamespace(api=api, storage=None), None, ChatSettings(deploy_window_s=window_s))


async def test_a_slow_deploy_does_not_stop_other_requests(fake):
    import asyncio
    import time

    engine = engine_with(SlowDeploy(fake, seconds=3))
    deploying = asyncio.create_task(engine.create(model="slow-base", messages=HELLO))
    await asyncio.sleep(0.3)  # the window closed: deploy() is running
    latencies = []
    for i in range(5):
        started = time.monotonic()
        reply = await engine.create(model="gpt-4o", messages=[{"role": "user", "content": f"m{i}"}], max_tokens=3)
        latencies.append(time.monotonic() - started)
        assert reply.choices[0].message.content == f"m{i}"[::-1]
    assert not deploying.done(), "the deploy was still going on while the other requests were answered"
    assert max(latencies) < 1.5, latencies  # with deploy() on the loop, the first waited for all 3 s of it
    assert (await deploying).choices[0].message.content == "ereht olleh"
    await engine.aclose()


async def test_closing_during_a_deploy_window_tells_its_requests_and_leaves_no_task(fake):
    import asyncio

    from ow_prefect import OWError

    engine = engine_with(SlowDeploy(fake, seconds=0), window_s=30)
    waiting = asyncio.create_task(engine.create(model="slow-base", messages=HELLO))
    await asyncio.sleep(0.2)
    assert len(engine._flushes) == 1
    await engine.aclose()
    with pytest.raises(OWError, match="deploying slow-base was stopped: the chat client was closed"):
        await waiting
    assert engine._flushes == set() and engine.settings.deploy_window_s == 30


def test_an_interrupt_during_a_deploy_is_not_swallowed(fake):
    """KeyboardInterrupt (or SystemExit) in deploy() ends the loop, as everywhere else, instead of becoming one
    more failed request."""
    import asyncio

    async def scenario():
        engine = engine_with(SlowDeploy(fake, seconds=0, error=KeyboardInterrupt()))
        await engine.create(model="slow-base", messages=HELLO)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(scenario())


def test_a_failed_deploy_names_its_cause_and_the_next_request_tries_again(fake):
    import asyncio

    from ow_prefect import OWError

    async def scenario():
        api = SlowDeploy(fake, seconds=0, error=RuntimeError("no GPU today"))
        engine = engine_with(api)
        with pytest.raises(OWError, match="deploying slow-base failed: RuntimeError: no GPU today"):
            await engine.create(model="slow-base", messages=HELLO)
        api.error = None
        assert (await engine.create(model="slow-base", messages=HELLO)).choices[0].message.content == "ereht olleh"
        assert api.deployed == ["slow-base"]
        await engine.aclose()

    asyncio.run(scenario())

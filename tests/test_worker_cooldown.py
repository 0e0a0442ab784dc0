"""The cooldown ladder (ow_prefect/workers/cooldown.py) on the session's Prefect server, with a clock the test moves:
it escalates 10 min → 1 h → 6 h → 24 h (and stays), resets on a success, treats one incident seen by two workers
as one failure, and survives Variables edited by hand."""

import pytest

from ow_prefect.workers.cooldown import LADDER_SECONDS, TAG, Cooldown, CooldownStore, escalate, variable_name

IMAGE = "ghcr.io/test/ow-cooldown:1"
A6000, TX = "NVIDIA RTX A6000", "US-TX-3"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def client(use_server):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        yield client
        await CooldownStore(client).clear()


async def fail(store: CooldownStore, clock: Clock, rented_ago: float = 60, data_center: str = TX) -> Cooldown:
    return await store.record_failure(
        A6000, data_center, IMAGE, reason="health check failed: no GPU", pod="pod1", pod_created_at=clock() - rented_ago
    )


async def test_the_ladder_escalates_each_time_the_cooldown_ran_out_and_a_new_pod_failed(client):
    clock = Clock()
    store = CooldownStore(client, clock=clock)
    steps = []
    for _ in range(6):
        state = await fail(store, clock)
        steps.append(state.until - clock())
        assert [entry.key for entry in await store.active(IMAGE)] == [(A6000, TX, IMAGE)]
        clock.advance(state.until - clock() + 1)  # the cooldown runs out; the next run rents the type again
        assert await store.active(IMAGE) == []
    assert steps == [600, 3600, 6 * 3600, 24 * 3600, 24 * 3600, 24 * 3600]
    assert (await store.entries())[0].failures == 6


async def test_a_success_resets_the_ladder(client):
    clock = Clock()
    store = CooldownStore(client, clock=clock)
    for _ in range(3):
        state = await fail(store, clock)
        clock.advance(state.until - clock() + 1)
    assert state.level == 2
    assert await store.record_success(A6000, TX, IMAGE, pod_created_at=clock()) is True
    assert await store.entries() == []
    assert (await fail(store, clock)).until - clock() == LADDER_SECONDS[0]


async def test_a_pod_rented_before_the_cooldown_neither_climbs_nor_clears_it(client):
    """Two workers whose pods were rented together and failed together: one incident, in either order of writes."""
    clock = Clock()
    store, other_worker = CooldownStore(client, clock=clock), CooldownStore(client, clock=clock)
    first = await fail(store, clock, rented_ago=120)
    clock.advance(30)
    second = await fail(other_worker, clock, rented_ago=150)  # rented before `first` was recorded
    assert (second.level, second.until, second.failures) == (0, first.until, 2)
    assert await store.record_success(A6000, TX, IMAGE, pod_created_at=first.since - 1) is False
    assert len(await store.active(IMAGE)) == 1


async def test_keys_are_per_data_center_and_image_and_clear_by_type(client):
    clock = Clock()
    store = CooldownStore(client, clock=clock)
    await fail(store, clock, data_center="EU-RO-1")
    await store.record_failure("NVIDIA L4", None, IMAGE, reason="x", pod="p", pod_created_at=clock())
    assert [entry.key[:2] for entry in await store.active(IMAGE)] == [("NVIDIA L4", "*"), (A6000, "EU-RO-1")]
    assert await store.active("another-image:1") == []
    assert [entry.gpu_type for entry in await store.clear(A6000)] == [A6000]
    assert [entry.gpu_type for entry in await store.entries()] == ["NVIDIA L4"]


async def test_a_variable_edited_by_hand_is_ignored_not_fatal(client):
    from prefect.client.schemas.actions import VariableCreate

    await client.create_variable(VariableCreate(name=variable_name("x", "y", "z"), value={"level": "high"}, tags=[TAG]))
    await client.create_variable(VariableCreate(name="ow-gpu-cooldown-notes", value="keep these cool", tags=[TAG]))
    try:
        clock = Clock()
        store = CooldownStore(client, clock=clock)
        await fail(store, clock)
        assert [entry.gpu_type for entry in await store.entries()] == [A6000]
    finally:
        await client.delete_variable_by_name("ow-gpu-cooldown-notes")
        await client.delete_variable_by_name(variable_name("x", "y", "z"))


def test_a_week_without_failures_starts_the_ladder_again():
    old = Cooldown(A6000, TX, IMAGE, level=3, since=0, until=86400, failures=9, reason="x")
    fresh = escalate(old, old.key, reason="y", pod="p", pod_created_at=8 * 86400, now=8 * 86400 + 60)
    assert (fresh.level, fresh.failures) == (0, 1)


def test_descriptions_say_how_long_and_why():
    state = Cooldown(A6000, TX, IMAGE, level=1, since=0, until=3600, failures=2, reason="no GPU")
    assert state.state(now=480) == "cooling down until 1970-01-01 01:00 UTC (52 min more, step 2/4 (1 h)): no GPU"
    assert state.state(now=4000) == "cooldown over since 1970-01-01 01:00 UTC (a new failure: 6 h): no GPU"
    assert state.describe(now=0) == f"{A6000} in {TX} for {IMAGE}: {state.state(0)}; 2 failure(s)"

"""The sync SDK runs the async core (`ow_prefect/client/_loop.py`): the twins stay in step, and sync calls work
from a thread that runs an event loop (a notebook), from many threads at once, and in embedded mode with the
caller's thread doing the blocking work."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import BaseModel, ConfigDict

from ow_prefect import AsyncOpenWeights, Job, OpenWeights, ParameterError, register
from ow_prefect.client._loop import blocking, iterate_sync, run_sync, sdk_loop
from ow_prefect.client.files import AsyncFiles, Files
from ow_prefect.client.jobs import AsyncJobs, Jobs
from ow_prefect.client.runs import AsyncEvents, AsyncRuns, Events, Runs

TWINS = [(Jobs, AsyncJobs), (Runs, AsyncRuns), (Events, AsyncEvents), (Files, AsyncFiles)]


def public_methods(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls) if not name.startswith("_") and callable(member)}


@pytest.mark.parametrize("sync,core", TWINS, ids=[sync.__name__ for sync, _ in TWINS])
def test_the_sync_and_async_twins_have_the_same_methods_signatures_and_docs(sync, core):
    sync_methods, async_methods = public_methods(sync), public_methods(core)
    assert sorted(sync_methods) == sorted(async_methods)
    for name, method in sync_methods.items():
        twin = async_methods[name]
        assert inspect.signature(method) == inspect.signature(twin), name
        assert not inspect.iscoroutinefunction(method) and inspect.iscoroutinefunction(twin), name
        assert method.__doc__ == twin.__doc__, f"{sync.__name__}.{name}: the docstring differs from its twin's"
    assert all(method.__doc__ for method in public_methods(Jobs).values()), "every ow.jobs method says what it does"


class ThreadParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str


PREPARED_IN: list[threading.Thread] = []


@register("thread_probe")
class ThreadProbeJob(Job):
    """Records which thread prepares its parameters (a blocking step of submission), then stops it."""

    deployment = "custom/run"
    entrypoint = "flows/custom.py:custom_run"
    params = ThreadParams

    @classmethod
    def prepare_params(cls, params, storage):
        PREPARED_IN.append(threading.current_thread())
        raise ParameterError("the probe stops here")


def test_blocking_steps_run_in_the_sync_callers_thread_and_off_the_loop_for_async_callers():
    PREPARED_IN.clear()
    with pytest.raises(ParameterError, match="the probe stops here"):
        OpenWeights().thread_probe.create(label="sync")
    assert PREPARED_IN[0] is threading.current_thread() and len(PREPARED_IN) == 1

    async def submit() -> threading.Thread:
        with pytest.raises(ParameterError, match="the probe stops here"):
            await AsyncOpenWeights().thread_probe.create(label="async")
        return threading.current_thread()

    caller = asyncio.run(submit())
    worker = PREPARED_IN[-1]
    assert worker not in (caller, threading.current_thread()) and worker.name != "ow-sdk-loop", "a worker thread"


def test_sync_calls_work_where_the_thread_already_runs_an_event_loop():
    """A notebook cell runs inside a running loop; `asyncio.run` would refuse there."""
    ow = OpenWeights()
    job = ow.custom.create(entrypoint="echo from a notebook")

    async def cell():
        asyncio.get_running_loop()
        return ow.jobs.retrieve(job.id), ow.jobs.list(type="custom", limit=5), ow.runs.list(job_id=job.id)

    retrieved, listed, runs = asyncio.run(cell())
    assert retrieved == job and job in listed and runs[-1].id == job.flow_run_id


def test_sync_calls_from_many_threads_share_one_loop():
    ow = OpenWeights()
    job = ow.custom.create(entrypoint="echo shared by threads")
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda _: ow.jobs.retrieve(job.id), range(32)))
    assert set(found) == {job}, "equal jobs hash equal, so a set keeps one"
    assert len(ow._async_clients) == 1, "one Prefect client for every thread, on the SDK's loop"
    ow.close()
    assert not ow._async_clients
    assert ow.jobs.retrieve(job.id) == job, "a closed client opens again when used"


CALLER = contextvars.ContextVar("caller", default="none")


def test_the_core_runs_in_the_callers_context_and_its_blocking_steps_in_the_callers_thread():
    async def core():
        return CALLER.get(), await blocking(threading.current_thread), threading.current_thread().name

    token = CALLER.set("notebook cell")
    try:
        seen, blocking_thread, loop_thread = run_sync(core())
    finally:
        CALLER.reset(token)
    assert (seen, blocking_thread, loop_thread) == ("notebook cell", threading.current_thread(), "ow-sdk-loop")


def test_errors_of_blocking_steps_and_of_the_core_reach_the_caller():
    async def fails_in_blocking():
        return await blocking(int, "not a number")

    with pytest.raises(ValueError, match="not a number"):
        run_sync(fails_in_blocking())

    async def gen():
        yield 1
        raise LookupError("after the first item")

    items = iterate_sync(gen())
    assert next(items) == 1
    with pytest.raises(LookupError):
        next(items)


def test_ctrl_c_while_waiting_stops_the_coroutine():
    stopped = threading.Event()

    async def waits_forever():
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal or a notebook
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sync(waits_forever())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 5
    assert stopped.wait(5), "the coroutine was cancelled"


def test_a_sync_call_on_the_sdks_own_loop_is_refused_not_a_deadlock():
    async def inner():
        return 1

    async def calls_sync():
        return run_sync(inner())

    with pytest.raises(RuntimeError, match="would wait forever"):
        asyncio.run_coroutine_threadsafe(calls_sync(), sdk_loop()).result(timeout=10)


def test_ow_api_hands_out_sync_objects_from_either_client():
    """`TemporaryApi` and its job are sync; on the async client they use a sync twin on the same settings."""
    sync = OpenWeights()
    assert sync._sync_twin() is sync
    async_ow = AsyncOpenWeights()
    twin = async_ow._sync_twin()
    assert isinstance(twin, OpenWeights) and twin.settings is async_ow.settings
    assert twin.embedded == async_ow.embedded and twin._prefect_api == async_ow._prefect_api

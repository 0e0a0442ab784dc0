"""flows/_runtime.py's job lock on Prefect's ephemeral API (embedded): a lock whose holder is gone is cleared, and
a second run of a serving API ends at once naming the run that serves it. Identity across the real server's entry
points is in test_job_identity.py."""

import threading
import time

from prefect import flow

from flows import _runtime
from ow_prefect import OpenWeights
from ow_prefect.jobs.api import ApiJob
from ow_prefect.jobs.submit import cached_tag, lock_name


def logs_of(flow_run_id, expecting: str, timeout: float = 30) -> str:
    """The run's Prefect logs once `expecting` is among them (or all there are after `timeout`): an in-process
    run's log lines reach the server in batches, so the last ones can arrive after the run is Completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if expecting in text or time.monotonic() > deadline:
                return text
            time.sleep(0.5)


def test_a_lock_that_no_run_holds_is_cleared(monkeypatch):
    """The holder died and the server lost its lease (leases live in the server's memory: a restart loses
    them), so the slot stays taken with nobody to release it: the next run of the job clears it and works."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.custom import custom_run

    monkeypatch.setattr(_runtime, "LOCK_POLL_SECONDS", 0.5)
    entrypoint = f"echo after a stale lock {time.time_ns()}"
    job_id = OpenWeights().custom.validate(entrypoint=entrypoint)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=lock_name(job_id), limit=1, active_slots=1)
        )
    state = custom_run(entrypoint=entrypoint, return_state=True)
    assert state.is_completed(), state
    expected = f"the lock of job {job_id} is held by no active run: clearing it"
    assert expected in logs_of(state.state_details.flow_run_id, expected)
    with get_client(sync_client=True) as client:
        assert not [lim for lim in client.read_global_concurrency_limits(limit=200) if job_id in lim.name]


def test_a_second_run_of_a_serving_api_ends_at_once(tiny_model):
    """The serving run is a stand-in (a flow that takes the API job's lock as `vllm-api` does, without vLLM);
    the second run is the real `vllm-api` flow, which must start nothing."""
    from flows.vllm_api.flow import vllm_api

    params = {"model": str(tiny_model)}
    holding, release = threading.Event(), threading.Event()

    @flow(name="stand-in-api")
    def serving():
        job = _runtime.start_job(ApiJob, dict(params), None)
        with _runtime.job_lock(job, wait=False) as held:
            assert held
            holding.set()
            release.wait(120)

    server = threading.Thread(target=serving, kwargs={"return_state": True})
    server.start()
    try:
        assert holding.wait(120), "the stand-in never took the lock"
        started = time.monotonic()
        state = vllm_api(**params, return_state=True)
        took = time.monotonic() - started
    finally:
        release.set()
        server.join(60)
    job_id = OpenWeights().vllm_api.validate(**params)
    assert state.is_completed() and f"API job {job_id} is already served by flow run '" in state.message
    assert "started nothing" in state.message and took < 60
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert cached_tag(job_id) in client.read_flow_run(state.state_details.flow_run_id).tags

"""The one retry policy (ow_prefect/retry.py): which errors are retried, Retry-After, back-off, giving up."""

import time

import pytest

from ow_prefect.retry import RETRY_AFTER_CAP_S, RetryRules, retry_after_seconds


class Busy(Exception):
    def __init__(self, retry_after: float | None = None):
        super().__init__("busy")
        self.retry_after = retry_after


class Broken(Exception):
    pass


def failing(errors: list[Exception], answer: str = "done"):
    calls = []

    async def call():
        calls.append(time.monotonic())
        if errors:
            raise errors.pop(0)
        return answer

    return call, calls


RULES = RetryRules(retry_on=lambda e: isinstance(e, Busy), attempts=4, initial_s=0.01, max_s=0.02)


async def test_a_retryable_error_is_tried_again_until_it_passes():
    call, calls = failing([Busy(), Busy()])
    assert await RULES.acall(call) == "done" and len(calls) == 3


async def test_any_other_error_is_raised_at_once_unchanged():
    call, calls = failing([Broken()])
    with pytest.raises(Broken):
        await RULES.acall(call)
    assert len(calls) == 1


async def test_after_the_last_attempt_the_last_error_is_raised_unchanged():
    last = Busy()
    call, calls = failing([Busy(), Busy(), Busy(), last])
    with pytest.raises(Busy) as raised:
        await RULES.acall(call)
    assert raised.value is last and len(calls) == 4


async def test_retry_after_is_honoured_instead_of_the_back_off():
    rules = RetryRules(
        retry_on=lambda e: isinstance(e, Busy), attempts=2, initial_s=0, retry_after=lambda e: e.retry_after
    )
    call, calls = failing([Busy(retry_after=0.5)])
    assert await rules.acall(call) == "done"
    assert calls[1] - calls[0] >= 0.5


class FakeState:
    def __init__(self, attempt: int, error: BaseException):
        self.attempt_number = attempt
        self.outcome = type("Outcome", (), {"exception": lambda self: error})()


@pytest.mark.parametrize("attempt", [1, 2, 3, 8, 20])
def test_back_off_is_exponential_with_full_jitter_and_capped(attempt):
    rules = RetryRules(retry_on=lambda e: True, initial_s=1.0, max_s=30.0)
    waits = [rules.wait_s(FakeState(attempt, Busy())) for _ in range(200)]
    ceiling = min(30.0, 2 ** (attempt - 1))
    assert all(0 <= w <= ceiling for w in waits)
    assert max(waits) > ceiling / 2, "spread over the whole range"


def test_a_server_asking_for_hours_is_waited_for_two_minutes_at_most():
    rules = RetryRules(retry_on=lambda e: True, retry_after=lambda e: e.retry_after)
    assert rules.wait_s(FakeState(1, Busy(retry_after=7))) == 7
    assert rules.wait_s(FakeState(1, Busy(retry_after=86400))) == RETRY_AFTER_CAP_S == 120


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), (None, None)])
def test_retry_after_header(header, seconds):
    assert retry_after_seconds(header) == seconds

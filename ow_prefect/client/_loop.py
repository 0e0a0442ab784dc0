"""How the sync SDK runs its async core: Prefect I/O on one event loop thread, blocking work in the caller's.

The resources that talk to Prefect (`ow.jobs`, `ow.runs`, `ow.events`) are written once, async
(`AsyncJobs`, ...); their sync faces (`Jobs`, ...) call ``run_sync(core.method(...))``:

- The coroutine runs on the SDK's event loop, a daemon thread started on first use (one per process, like
  Prefect's own sync-over-async loop, `prefect.utilities.asyncutils.run_coro_as_sync`). Prefect's async client
  is bound to the loop it was opened on, so one loop keeps one client per `OpenWeights` open across calls and
  threads. `asyncio.run` per call would fail where the caller's thread already runs a loop (a notebook) and
  open a new client (TLS context, connection pool) every time.
- While it waits, the calling thread does the coroutine's blocking work: the core hands every blocking step
  (storage, validation, an embedded flow run) to `blocking`, which sends it back to the waiting thread. So a
  sync caller's flows, storage reads and Prefect settings stay in its own thread and context, as in a
  hand-written sync client, and Ctrl-C stops them; for an async caller `blocking` uses a worker thread, so its
  event loop never blocks. The coroutine also runs in a copy of the caller's context (Prefect's settings,
  tags, the flow run it is called from).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# The queue of the sync caller waiting on the running coroutine (None: an async caller).
_WAITING_THREAD: contextvars.ContextVar[queue.SimpleQueue | None] = contextvars.ContextVar(
    "ow_waiting_thread", default=None
)
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def sdk_loop() -> asyncio.AbstractEventLoop:
    """The SDK's event loop, started on first use (again in a forked child, whose copy has no thread)."""
    global _loop, _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _loop = asyncio.new_event_loop()
            _thread = threading.Thread(target=_loop.run_forever, name="ow-sdk-loop", daemon=True)
            _thread.start()
        return _loop


def running_sdk_loop() -> asyncio.AbstractEventLoop | None:
    """The SDK's event loop if it was started (and not lost to a fork), without starting it."""
    return _loop if _thread is not None and _thread.is_alive() else None


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on the SDK's loop and return its result; this thread runs its `blocking` steps."""
    loop = sdk_loop()
    if threading.current_thread() is _thread:
        coroutine.close()
        raise RuntimeError("a sync ow_prefect call on the SDK's own event loop would wait forever: await the async one")
    waiting: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
    context = contextvars.copy_context()
    context.run(_WAITING_THREAD.set, waiting)
    # run_coroutine_threadsafe schedules the task from this context, so the task runs in a copy of it.
    future = context.run(asyncio.run_coroutine_threadsafe, coroutine, loop)
    future.add_done_callback(lambda _: waiting.put(None))
    try:
        while (call := waiting.get()) is not None:
            call.run()
    except BaseException:  # Ctrl-C (or SystemExit) in this thread: stop the coroutine too
        future.cancel()
        raise
    return future.result()


def iterate_sync(generator: AsyncGenerator[T, None]) -> Iterator[T]:
    """An async generator of the core as a sync one: each item is one `run_sync`."""

    async def step() -> T:
        return await anext(generator)

    async def close() -> None:
        await generator.aclose()

    try:
        while True:
            try:
                yield run_sync(step())
            except StopAsyncIteration:
                return
    finally:
        run_sync(close())


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` off the event loop: in the waiting sync caller's thread, else a worker thread."""
    waiting = _WAITING_THREAD.get()
    if waiting is None:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
    loop = asyncio.get_running_loop()
    call = _Call(functools.partial(fn, *args, **kwargs), loop, loop.create_future())
    waiting.put(call)
    return await call.reply


@dataclass
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    reply: asyncio.Future

    def run(self) -> None:
        try:
            result = self.fn()
        except Exception as exc:  # the coroutine gets it, as if it had raised there
            self.loop.call_soon_threadsafe(_settle, self.reply, None, exc)
        else:
            self.loop.call_soon_threadsafe(_settle, self.reply, result, None)


def _settle(reply: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if reply.done():  # the coroutine was cancelled meanwhile
        return
    if exc is not None:
        reply.set_exception(exc)
    else:
        reply.set_result(result)


def same_docs(core: type) -> Callable[[type], type]:
    """Class decorator of a sync face: its methods without a docstring take the core's (written once)."""

    def decorate(face: type) -> type:
        for name, method in vars(face).items():
            twin = getattr(core, name, None)
            if callable(method) and not method.__doc__ and twin is not None and twin.__doc__:
                method.__doc__ = twin.__doc__
        return face

    return decorate

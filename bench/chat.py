"""The chat client against a bare `AsyncOpenAI` + `asyncio.Semaphore`, on one local OpenAI-compatible server.

    .venv/bin/python bench/chat.py [--requests 2000] [--concurrency 64] [--queued 100000]

The server is tests/fake_openai.py in its own process, pinned to the last core and the client to the others
(answers in ~1 ms, plus `--delay`): what is measured is the client.
Prints, in one run:
- throughput at `--concurrency` in flight: ow.chat's batch vs the baseline (goal ≥ 0.95×);
- cache-hit latency: p50 and p99 of a seeded request answered from disk (goal p50 ≤ 1 ms);
- peak RSS while `--queued` requests are fed lazily to `batch()` (goal: flat, i.e. about the same as for
  a tenth of them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.results import emit, row  # noqa: E402

ROUNDS = 6


def pin(pid: int, cpus: set[int]) -> None:
    """Pins a process to `cpus` when the machine has more than one core, so the server and the client do not
    compete for one (on two cores that competition swung the ratio from 0.7× to 1.9× between runs)."""
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(pid, cpus)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def requests(n: int, tag: str):
    for i in range(n):
        yield {"model": "gpt-bench", "messages": [{"role": "user", "content": f"{tag} {i}"}], "max_tokens": 8}


async def throughput(url: str, key: str, n: int, concurrency: int, cache_dir: Path) -> dict[str, tuple]:
    """Requests per second of the baseline and of the async client: the median of ROUNDS interleaved rounds,
    in one event loop."""
    import openai

    from ow_prefect import AsyncOpenWeights
    from ow_prefect.settings import OWSettings

    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)
    ow = AsyncOpenWeights(settings=OWSettings(chat_cache_dir=cache_dir))

    async def one(request):
        async with semaphore:
            return await client.chat.completions.create(**request)

    async def raw(tag: str) -> None:
        await asyncio.gather(*(one(r) for r in requests(n, tag)))

    async def ours(tag: str) -> None:
        await ow.chat.completions.batch(requests(n, tag), progress=False)

    async def timed(side, tag: str) -> tuple[float, float]:
        """(requests per second, client CPU milliseconds per request)"""
        wall, cpu = time.perf_counter(), time.process_time()
        await side(tag)
        return n / (time.perf_counter() - wall), (time.process_time() - cpu) * 1000 / n

    await raw("warm-raw")
    await ow.chat.completions.create(**next(requests(1, "warm")))
    rounds: dict[str, list[tuple[float, float]]] = {"raw": [], "ours": []}
    for i in range(ROUNDS):  # interleaved, the order alternating, so drift hits both sides alike
        order = [("raw", raw), ("ours", ours)] if i % 2 == 0 else [("ours", ours), ("raw", raw)]
        for name, side in order:
            rounds[name].append(await timed(side, f"{name}{i}"))
    await client.close()
    await ow.chat.aclose()
    return {name: tuple(statistics.median(x) for x in zip(*values, strict=True)) for name, values in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--delay", type=float, default=0.0, help="server-side seconds per request")
    args = parser.parse_args()
    from ow_prefect import OpenWeights
    from ow_prefect.settings import OWSettings
    from ow_prefect.testing.servers import free_port

    work = Path(tempfile.mkdtemp(prefix="ow-bench-chat-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), str(port), str(args.delay)])
    cores = sorted(os.sched_getaffinity(0))
    pin(server.pid, {cores[-1]})
    pin(0, set(cores[:-1]) or {cores[0]})
    url, key = f"http://127.0.0.1:{port}/v1", "sk-fake"
    try:
        wait_until_up(url)
        os.environ.update(OPENAI_BASE_URL=url, OPENAI_API_KEY=key)
        os.environ["OW_OPENAI_CONCURRENCY"] = str(args.concurrency)
        medians = asyncio.run(throughput(url, key, args.requests, args.concurrency, work / "async-cache"))
        (raw, raw_cpu), (ours, ours_cpu) = medians["raw"], medians["ours"]
        ow = OpenWeights(settings=OWSettings(chat_cache_dir=work / "cache"))
        ow.chat.completions.create(**next(requests(1, "warm")))
        start = time.perf_counter()
        ow.chat.completions.batch(requests(args.requests, "sync"), progress=False)
        sync = args.requests / (time.perf_counter() - start)
        print(
            f"throughput at {args.concurrency} in flight (median of {ROUNDS} interleaved rounds): "
            f"bare AsyncOpenAI + Semaphore {raw:.0f} req/s, "
            f"ow.chat (async) {ours:.0f} req/s → {ours / raw:.2f}× (goal ≥ 0.95×); sync client's batch {sync:.0f} "
            f"req/s → {sync / raw:.2f}×"
        )
        print(
            f"client CPU per request (median of {ROUNDS} rounds each): bare {raw_cpu:.2f} ms, ow.chat {ours_cpu:.2f} "
            f"ms → {ours_cpu / raw_cpu:.2f}×"
        )

        seeded = {"model": "gpt-bench", "messages": [{"role": "user", "content": "cached"}], "seed": 0}
        ow.chat.completions.create(**seeded)
        hits = []
        for _ in range(2000):
            t = time.perf_counter()
            ow.chat.completions.create(**seeded)
            hits.append((time.perf_counter() - t) * 1000)
        hits.sort()
        p50, p99 = statistics.median(hits), hits[int(len(hits) * 0.99)]
        print(f"cache hit: p50 {p50:.3f} ms, p99 {p99:.3f} ms (goal p50 ≤ 1 ms)")

        small = args.queued // 10
        peak = {"rss": 0.0}

        def watch(index, answer):
            if index % 1000 == 0:
                peak["rss"] = max(peak["rss"], rss_mb())

        before = rss_mb()
        ow.chat.completions.batch(requests(small, "mem-small"), progress=False, on_result=watch)
        small_peak, peak["rss"] = peak["rss"], 0.0
        ow.chat.completions.batch(requests(args.queued, "mem"), progress=False, on_result=watch)
        print(
            f"RSS: {before:.0f} MB before; peak {small_peak:.0f} MB while {small} requests were fed, "
            f"{peak['rss']:.0f} MB while {args.queued} were (read ahead ≤ {ow.chat.settings.max_in_flight})"
        )
        ow.chat.close()
        emit(
            "chat",
            [
                row(
                    f"throughput at {args.concurrency} in flight",
                    round(ours),
                    round(raw),
                    "req/s",
                    "ratio ≥ 0.95",
                    ours >= 0.95 * raw,
                ),
                row("client CPU per request", round(ours_cpu, 3), round(raw_cpu, 3), "ms"),
                row("cache hit p50", round(p50, 4), None, "ms", "ours ≤ 1 ms", p50 <= 1),
                row(
                    f"peak RSS, {args.queued} vs {small} fed",
                    round(peak["rss"]),
                    round(small_peak),
                    "MB",
                    "ratio ≤ 1.2 (flat)",
                    peak["rss"] <= 1.2 * small_peak,
                ),
            ],
        )
    finally:
        server.terminate()
        server.wait()


def wait_until_up(url: str) -> None:
    import httpx

    for _ in range(200):
        try:
            httpx.get(f"{url}/models", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the fake server at {url} did not start")


if __name__ == "__main__":
    main()

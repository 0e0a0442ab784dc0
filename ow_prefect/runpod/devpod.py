"""A development pod: a GPU pod from an image, with ssh and no flow run, deleted when you are done.

    python -m ow_prefect.runpod.devpod --image ghcr.io/me/ow-train:0.1 --min-vram-gb 40 --hours 2

It creates the cheapest pod that fits (same ranking and fallback as the `runpod` worker), waits until it is
up, prints how to connect, and deletes it on Ctrl-C, SIGTERM or after `--hours` — whichever comes first — so a
forgotten terminal does not bill for days. The image's own command runs (ow_prefect's images stay up without a
flow run). ssh uses the account's registered keys (`startSsh`), or `--public-key` for this pod only.
Credentials: `--credentials BLOCK` (a saved RunPod Credentials block) or RUNPOD_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ow_prefect.errors import OWError
from ow_prefect.runpod.credentials import RunPodCredentials
from ow_prefect.runpod.errors import RunPodError, RunPodNotFound
from ow_prefect.runpod.models import Pod
from ow_prefect.runpod.offers import CLOUDS, create_on_first, find_candidates

DEV_POD_PREFIX = "ow-dev-"


async def dev_pod(
    image: str,
    *,
    credentials: RunPodCredentials,
    gpu_types: Sequence[str] = (),
    min_vram_gb: float = 16,
    gpu_count: int = 1,
    cloud: str = "SECURE",
    max_price_per_hour: float | None = None,
    hours: float = 4.0,
    disk_gb: int = 50,
    volume_gb: int | None = None,
    ports: Sequence[str] = (),
    public_key: str | None = None,
    ready_timeout: float = 900.0,
    poll_seconds: float = 2.0,
    printer: Callable[[str], Any] = print,
) -> Pod:
    """Run one dev pod until cancelled or `hours` pass; it is always deleted. Returns the pod as created."""
    clouds = CLOUDS if cloud == "ANY" else (cloud,)
    request: dict[str, Any] = {
        "name": f"{DEV_POD_PREFIX}{secrets.token_hex(4)}",
        "image": image,
        "disk": disk_gb,
        "ports": sorted({"22/tcp", *ports}),
        "startSsh": True,
    }
    if public_key:
        request["env"] = {"PUBLIC_KEY": public_key}
    if volume_gb:
        request["mounts"] = {"persistent": {"size": volume_gb, "path": "/workspace"}}
    async with credentials.get_client() as runpod:
        candidates = await find_candidates(
            runpod,
            min_vram_gb=min_vram_gb,
            gpu_count=gpu_count,
            preferred=gpu_types,
            clouds=clouds,
            max_price_per_hour=max_price_per_hour,
        )
        pod, candidate = await create_on_first(runpod, request, candidates, log=printer)
        created = time.monotonic()
        try:
            printer(f"Pod {pod.id} ({pod.name}): {candidate}. Deleted on Ctrl-C or after {hours:g} h.")
            current = await _wait_until_up(runpod, pod.id, ready_timeout, poll_seconds)
            for line in connection_lines(current):
                printer(line)
            remaining = hours * 3600 - (time.monotonic() - created)
            await asyncio.sleep(max(0.0, remaining))
            printer(f"{hours:g} h passed.")
        finally:
            with contextlib.suppress(RunPodNotFound):
                await asyncio.shield(runpod.delete_pod(pod.id))
            billed = time.monotonic() - created
            cost = candidate.price_per_hour * billed / 3600
            printer(f"Pod {pod.id} deleted after {billed / 60:.1f} min (about ${cost:.2f}).")
    return pod


async def _wait_until_up(runpod: Any, pod_id: str, timeout: float, poll_seconds: float) -> Pod:
    deadline = time.monotonic() + timeout
    while True:
        pod = await runpod.get_pod(pod_id)
        if pod.started:
            return pod
        if pod.ended:
            raise RunPodError(f"pod {pod_id} ended while starting ({pod.status})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"pod {pod_id} did not start within {timeout:g} s")
        await asyncio.sleep(poll_seconds)


def connection_lines(pod: Pod) -> list[str]:
    """How to reach the pod: ssh (direct when 22/tcp is published, else RunPod's proxy) and every http port."""
    ssh = pod.ssh or {}
    lines = []
    if ssh.get("direct"):
        lines.append(f"ssh:   {ssh['direct']['command']}    (scp, rsync and port forwarding work here)")
    if ssh.get("proxy"):
        lines.append(f"ssh:   {ssh['proxy']['command']}    (RunPod's proxy: interactive shell only)")
    for port in pod.runtime.ports if pod.runtime else []:
        if port.get("type") == "http":
            lines.append(f"http:  https://{pod.id}-{port['private']}.proxy.runpod.net")
    return lines or [f"Pod {pod.id} is up (no ssh details reported: is an ssh key registered with RunPod?)"]


def main(argv: list[str] | None = None, prog: str = "python -m ow_prefect.runpod.devpod") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.replace("python -m ow_prefect.runpod.devpod", prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--image", required=True, help="container image (e.g. ow_prefect's training image)")
    parser.add_argument("--gpu", action="append", default=[], dest="gpu_types", help="GPU type id; repeat to prefer")
    parser.add_argument("--min-vram-gb", type=float, default=16)
    parser.add_argument("--gpu-count", type=int, default=1)
    parser.add_argument("--cloud", choices=["SECURE", "COMMUNITY", "ANY"], default="SECURE")
    parser.add_argument("--max-price", type=float, dest="max_price_per_hour", help="USD per hour for the pod")
    parser.add_argument("--hours", type=float, default=4.0, help="delete the pod after this long (default 4)")
    parser.add_argument("--disk-gb", type=int, default=50)
    parser.add_argument("--volume-gb", type=int, help="a volume at /workspace (at least 10)")
    parser.add_argument("--port", action="append", default=[], dest="ports", help="extra port, e.g. 8888/http")
    parser.add_argument("--public-key", type=Path, help="ssh public key file for this pod only")
    parser.add_argument("--credentials", help="name of a saved RunPod Credentials block (default: RUNPOD_API_KEY)")
    args = parser.parse_args(argv)
    try:
        credentials = RunPodCredentials.load(args.credentials, _sync=True) if args.credentials else None
        credentials = credentials or RunPodCredentials.from_env()
        options = vars(args) | {"credentials": credentials}
        options.pop("public_key")
        if args.public_key:
            options["public_key"] = args.public_key.expanduser().read_text().strip()
        asyncio.run(_run_until_signal(dev_pod(**options)))
    except KeyboardInterrupt:
        return 130
    except (OWError, ValueError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_until_signal(work: Any) -> None:
    """Run `work`; SIGTERM and SIGINT cancel it (so its `finally` deletes the pod) instead of killing us."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    sys.exit(main())

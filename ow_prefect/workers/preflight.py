"""What the `runpod` worker checks before it rents anything for a run: a room of the worker (workers/runpod.py).

The pod must reach the Prefect API: a run whose pod would call a loopback address (the worker's own
`PREFECT_API_URL` on a real RunPod) is refused, naming the setting to change. Without `OW_STORAGE_BLOCK` the
jobs in the pod keep their outputs on its own disk, lost with it: the worker warns once.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from ow_prefect.runpod.credentials import RunPodCredentials
    from ow_prefect.workers.runpod import RunPodJobConfiguration


class Preflight:
    """The checks before a pod, a mixin of `RunPodWorker` (whose `_warn_once` it uses)."""

    def _check_reachable(
        self, configuration: RunPodJobConfiguration, credentials: RunPodCredentials, logger: Any
    ) -> None:
        """Refuse before renting anything when the pod could not reach the Prefect API."""
        api_url = configuration.env.get("PREFECT_API_URL")
        if not api_url:
            raise ValueError(
                "PREFECT_API_URL is not set for the pod: start the worker against a Prefect server the pod can "
                "reach (Prefect Cloud or a public self-hosted URL), or set it in the job variables' env"
            )
        if _is_loopback(api_url) and not _is_loopback(credentials.api_url):
            raise ValueError(
                f"the pod would call the Prefect API at {api_url}, a loopback address it cannot reach: run the "
                "worker with PREFECT_API_URL set to a public URL (plus PREFECT_API_AUTH_STRING or a Cloud key), "
                "or override PREFECT_API_URL in the job variables' env"
            )
        if not configuration.env.get("OW_STORAGE_BLOCK") and not _is_loopback(credentials.api_url):
            self._warn_once(
                logger,
                "storage",
                "OW_STORAGE_BLOCK is not set: ow_prefect jobs in this pod keep their outputs on the pod's own disk, "
                "lost when it is deleted (set it on the worker, e.g. s3-bucket/ow-storage)",
            )


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

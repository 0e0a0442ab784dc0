"""FakeRunPod's pod logs: the lines a pod keeps (`LogLine`) and the logs route's server-sent events, a backlog
(`tail`, `since` or `Last-Event-ID`) then the new lines for `log_follow_seconds` (`LogStreams`, a mixin of
`FakeRunPod`)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from fastapi.responses import StreamingResponse

if TYPE_CHECKING:
    from ow_prefect.testing.fake_runpod.pods import FakePod

LOG_LINES_KEPT = 10_000


@dataclass
class LogLine:
    seq: int
    ts: datetime
    source: Literal["container", "system"]
    line: str

    def sse_event(self) -> str:
        ts = self.ts.isoformat(timespec="microseconds").replace("+00:00", "Z")
        data = json.dumps({"ts": ts, "source": self.source, "line": self.line})
        return f"id: {ts}/{self.seq:012d}\ndata: {data}\n\n"


def _now() -> datetime:
    return datetime.now(UTC)


class LogStreams:
    """Writing a pod's log and streaming it (a mixin of `FakeRunPod`: `_lock`, `_visible_pod`, `log_follow_seconds`)."""

    def _log(self, pod: FakePod, source: Literal["container", "system"], line: str) -> None:
        pod.logs.append(LogLine(pod.next_log_seq, _now(), source, line))
        pod.next_log_seq += 1
        del pod.logs[:-LOG_LINES_KEPT]

    def _open_log_stream(
        self, pod_id: str, source: str | None, tail: int, since: datetime | None, last_event_id: str | None
    ) -> StreamingResponse:
        with self._lock:
            pod = self._visible_pod(pod_id)
            lines = [line for line in pod.logs if source in (None, line.source)]
            backlog = _backlog(lines, tail, since, last_event_id)
            cursor = pod.next_log_seq - 1
        headers = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
        stream = self._stream_logs(pod, source, backlog, cursor)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def _stream_logs(self, pod: FakePod, source: str | None, backlog: list[LogLine], cursor: int):
        """Send the backlog, then follow new lines for `log_follow_seconds` (RunPod's stream stays open)."""
        for line in backlog:
            yield line.sse_event()
        deadline = time.monotonic() + self.log_follow_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            with self._lock:
                fresh = [line for line in pod.logs if line.seq > cursor and source in (None, line.source)]
                cursor = pod.next_log_seq - 1
                ended = pod.status == "TERMINATED"
            for line in fresh:
                yield line.sse_event()
            if ended:
                return


def _backlog(lines: list[LogLine], tail: int, since: datetime | None, last_event_id: str | None) -> list[LogLine]:
    """The lines a log stream starts with; `Last-Event-ID` wins over `since`, which wins over `tail`."""
    if last_event_id:
        timestamp, _, seq = last_event_id.partition("/")
        if seq.isdigit():
            return [line for line in lines if line.seq > int(seq)]
        resume_after = _as_utc(datetime.fromisoformat(timestamp))
        return [line for line in lines if line.ts > resume_after]
    if since:
        return [line for line in lines if line.ts >= since]
    return lines[-tail:] if tail else []


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo:
        return moment
    return moment.replace(tzinfo=UTC)

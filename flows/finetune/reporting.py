"""What a training run shows while it runs and leaves behind, and the checkpoints it keeps in storage.

Trainer callbacks (transformers' TrainerCallback) that talk to Prefect and to ow_prefect storage; the
training code itself (train.py) knows nothing of them.
"""

from __future__ import annotations

import base64
import math
import shutil
import time
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_image_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event
from transformers import TrainerCallback

from flows._runtime import flow_run_related, job_resource
from ow_prefect.storage import Storage

CHECKPOINT_PURPOSE = "checkpoint"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class PrefectReporter(TrainerCallback):
    """Each logged step -> an `ow.train.metrics` event and (at most every `log_every_s`, and always the first and
    last step and every evaluation) a line in the run's logs: step, loss, learning rate, tokens/s. A progress
    artifact updated as steps go by."""

    def __init__(self, job_id: str, flow_run_id: str | None, progress_every_s: float = 2.0, log_every_s: float = 5.0):
        self.job_id = job_id
        self.progress_every_s = progress_every_s
        self.progress_sent = 0.0
        self.log_every_s = log_every_s
        self.started: tuple[float, int] | None = None  # (time, tokens seen) when training began
        self.logged: tuple[float, int] | None = None  # (time, tokens seen) at the last log line
        self.related = flow_run_related(flow_run_id)
        self.progress_id = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = (time.monotonic(), state.num_input_tokens_seen or 0)
        self.progress_id = create_progress_artifact(
            progress=0.0,
            key=f"{self.job_id}-progress".replace("_", "-"),
            description=f"training steps done of {state.max_steps}",
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {k: v for k, v in (logs or {}).items() if _number(v)}
        emit_event(
            event="ow.train.metrics",
            resource=job_resource(self.job_id),
            related=self.related,
            payload={"step": state.global_step, "max_steps": state.max_steps, **metrics},
        )
        # Events are queued and sent in the background; the progress artifact is a request, so keep it rare.
        now = time.monotonic()
        last_step = state.global_step >= state.max_steps
        due = self.logged is None or last_step or "eval_loss" in metrics or now - self.logged[0] >= self.log_every_s
        if due and ("loss" in metrics or "eval_loss" in metrics):  # not the trainer's closing summary
            self._log_line(state, metrics, now)
        if self.progress_id and state.max_steps and (last_step or now - self.progress_sent >= self.progress_every_s):
            update_progress_artifact(self.progress_id, progress=100.0 * state.global_step / state.max_steps)
            self.progress_sent = now

    def _log_line(self, state, metrics: dict[str, Any], now: float) -> None:
        """`step 40/120  loss 1.2345  lr 3.20e-04  2,410 tokens/s` (tokens/s since the previous line)."""
        since, tokens_before = self.logged or self.started or (now, 0)
        tokens = state.num_input_tokens_seen or 0
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{name} {metrics[name]:.4f}" for name in ("loss", "eval_loss") if name in metrics]
        if "learning_rate" in metrics:
            parts.append(f"lr {metrics['learning_rate']:.2e}")
        if tokens > tokens_before and now > since:
            parts.append(f"{(tokens - tokens_before) / (now - since):,.0f} tokens/s")
        _logger().info("  ".join(parts))
        self.logged = (now, tokens)


def _logger() -> Any:
    """The run's logger (the Logs tab), or this module's outside a flow run (`python -m flows.finetune.train`)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


class CheckpointSync(TrainerCallback):
    """Every checkpoint the trainer writes goes to storage, so a rerun of the job resumes from it."""

    def __init__(self, job_id: str, storage: Storage):
        self.job_id = job_id
        self.storage = storage
        self.uploaded: list[str] = []

    @staticmethod
    def key(job_id: str) -> str:
        return f"checkpoints/{job_id}.json"

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            record = self.storage.put_path(folder, CHECKPOINT_PURPOSE)
            self.storage.put_json(self.key(self.job_id), {"step": state.global_step, "id": record.id})
            self.uploaded.append(record.id)

    def finish(self) -> None:
        """After a complete run, a restart trains from the start again instead of resuming at the end."""
        self.storage.put_json(self.key(self.job_id), {"completed": True, "checkpoints": self.uploaded})

    @classmethod
    def restore(cls, job_id: str, storage: Storage, output_dir: Path) -> Path | None:
        """Download the newest stored checkpoint of this job into `output_dir`, if there is one."""
        from ow_prefect.errors import NotFoundError

        try:
            latest = storage.get_json(cls.key(job_id))
        except NotFoundError:
            return None
        if "id" not in latest:
            return None
        target = output_dir / f"checkpoint-{int(latest['step'])}"  # a stored record: the step is a number
        shutil.rmtree(target, ignore_errors=True)
        storage.download(latest["id"], target)
        return target


def metrics_table(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step; floats to 4 significant digits (the UI shows every digit it gets)."""
    keys = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm"]
    return [
        {k: float(f"{h[k]:.4g}") if isinstance(h[k], float) else h[k] for k in keys if k in h}
        for h in history
        if "loss" in h or "eval_loss" in h
    ]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value < high + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


SERIES = {"loss": ("train", "#2563eb"), "eval_loss": ("eval", "#dc2626")}


def loss_curve_svg(history: list[dict[str, Any]], width: int = 640, height: int = 320) -> str:
    """A dependency-free SVG line chart of the training and evaluation loss against the step: axes with round
    ticks and grid lines, axis titles, and a legend naming each series."""
    series = {name: [(h["step"], h[name]) for h in history if _number(h.get(name))] for name in SERIES}
    points = [p for values in series.values() for p in values]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
    if not points:
        return f'{head}<text x="20" y="30" font-size="13">no loss was logged</text></svg>'
    left, right, top, bottom = 56, 16, 32, 44
    x_ticks = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    (x0, x1), (y0, y1) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def x_of(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * (width - left - right)

    def y_of(loss: float) -> float:
        return height - bottom - (loss - y0) / (y1 - y0) * (height - top - bottom)

    parts = [head, '<rect width="100%" height="100%" fill="white"/>']
    for tick in x_ticks:
        x = x_of(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" stroke="#e5e7eb"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{tick:g}</text>'
        )
    for tick in y_ticks:
        y = y_of(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>')
    parts.append(
        f'<polyline fill="none" stroke="#374151" points="{left},{top} {left},{height - bottom} '
        f'{width - right},{height - bottom}"/>'
    )
    parts.append(
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" font-size="12" text-anchor="middle">step</text>'
    )
    parts.append(
        f'<text x="14" y="{(top + height - bottom) / 2:.0f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">loss</text>'
    )
    legend_x = left + 8
    for name, values in series.items():
        if not values:
            continue
        label, color = SERIES[name]
        coordinates = " ".join(f"{x_of(step):.1f},{y_of(loss):.1f}" for step, loss in values)
        parts.append(
            f'<polyline class="{label}" fill="none" stroke="{color}" stroke-width="2" points="{coordinates}"/>'
        )
        parts += [f'<circle cx="{x_of(st):.1f}" cy="{y_of(lo):.1f}" r="2.5" fill="{color}"/>' for st, lo in values]
        parts.append(f'<line x1="{legend_x}" y1="16" x2="{legend_x + 18}" y2="16" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{legend_x + 24}" y="20" font-size="12">{label} loss</text>')
        legend_x += 110
    parts.append("</svg>")
    return "".join(parts)


def publish_results(job_id: str, history: list[dict[str, Any]], storage: Storage) -> str:
    """The metrics table and the loss curve (stored as a result file, shown as an image artifact)."""
    key = job_id.replace("_", "-")
    rows = metrics_table(history)
    if rows:
        create_table_artifact(table=rows, key=f"{key}-metrics", description=f"training metrics of {job_id}")
    svg = loss_curve_svg(history).encode()
    record = storage.put_bytes(svg, "result", filename="loss_curve.svg")
    create_image_artifact(
        image_url="data:image/svg+xml;base64," + base64.b64encode(svg).decode(),
        key=f"{key}-loss-curve",
        description=f"loss curve of {job_id} (file {record.id})",
    )
    return record.id


class PrefectSink:
    """Where the logprob and sampling callbacks' results go in a flow run: each is a result file (its id in the
    event, its path in job.outputs["files"]) and an event on the job (`ow.train.logprobs`, one
    `ow.train.logprob_block` per tagged block, `ow.train.samples`)."""

    def __init__(self, job_id: str, flow_run_id: str | None, storage: Storage):
        self.job_id, self.storage = job_id, storage
        self.related = PrefectReporter(job_id, flow_run_id).related
        self.files: dict[str, str] = {}
        self.records: dict[str, dict[str, list[dict[str, Any]]]] = {"logprobs": {}, "samples": {}}

    def _store(self, kind: str, tag: str, step: int, rows: list[dict[str, Any]]) -> str:
        from flows.finetune.callbacks import result_name
        from flows.finetune.data import jsonl_bytes

        name = result_name(kind, tag, step)
        record = self.storage.put_bytes(jsonl_bytes(rows), "result", filename=name.replace("/", "-"))
        self.files[name] = record.id
        return record.id

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        emit_event(event=event, resource=job_resource(self.job_id), related=self.related, payload=payload)

    def logprobs(self, tag: str, step: int, loss: float | None, rows: list[dict[str, Any]]) -> None:
        from flows.finetune.logprobs import tagged_blocks

        file_id = self._store("logprobs", tag, step, rows)
        payload = {"type": "logprobs", "tag": tag, "step": step, "value": loss, "file": file_id}
        self._emit("ow.train.logprobs", payload)
        self.records["logprobs"].setdefault(tag, []).append(payload)
        for conversation, row in enumerate(rows):
            for message, block, content in tagged_blocks(row):
                self._emit(
                    "ow.train.logprob_block",
                    {
                        "type": "logprob_block",
                        "source": tag,
                        "tag": content["tag"],
                        "step": step,
                        "value": content.get("logprobs"),
                        "weight": content.get("weight"),
                        "conversation": conversation,
                        "message": message,
                        "block": block,
                    },
                )

    def samples(self, tag: str, step: int, rows: list[dict[str, Any]]) -> None:
        payload = {"type": "samples", "tag": tag, "step": step, "file": self._store("samples", tag, step, rows)}
        self._emit("ow.train.samples", payload)
        self.records["samples"].setdefault(tag, []).append(payload)

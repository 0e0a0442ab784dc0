"""What a run computes, in tokens through one model: the part of an estimate that does not depend on the GPU.

Each job type says it with `Job.work(validated, storage)` (ow_prefect/jobs/*.py); the helpers here read a model's
size and count a stored JSONL file's rows and tokens without tokenizing (bytes / `bytes_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ow_prefect.costs.throughput import table

MAX_READ_BYTES = 64 * 1024**2  # a larger file's tokens come from its size alone (rows unknown)


@dataclass
class Work:
    """Tokens a run puts through its model. `decode_tokens` is (few, expected, many): how much is generated
    depends on where each completion stops. `open_ended` says why the runtime cannot be computed (an API serves
    until it is stopped; a custom command does what it does): the estimate is then a price per hour, bounded by
    `max_runtime` and `max_cost`."""

    model: str | None = None
    params: float | None = None
    text_config: dict[str, Any] | None = None
    weight_bytes: float | None = None  # in GPU memory (4-bit: ~0.56 bytes per parameter)
    train_tokens: float = 0.0
    train_flops_factor: float = 1.0  # × the 6N FLOPs per training token (DPO's reference forward: 8/6)
    prefill_tokens: float = 0.0
    decode_tokens: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sequence_tokens: float = 2048  # a sequence's length, for how many fit in the KV cache at once
    extra_seconds: float = 0.0  # after the work: merging, saving and uploading weights
    open_ended: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_tokens(self) -> bool:
        return bool(self.train_tokens or self.prefill_tokens or self.decode_tokens[2])

    @property
    def download_bytes(self) -> float:
        """The checkpoint's bytes on the Hub (16-bit; a 4-bit load quantizes while loading)."""
        return 2 * self.params if self.params else 0.0

    def describe(self) -> str:
        """One line: the model and the tokens."""
        parts = []
        if self.model:
            size = f"{self.params / 1e9:.2g}B parameters" if self.params else "size unknown"
            parts.append(f"{self.model} ({size})")
        for label, tokens in (
            ("training", self.train_tokens),
            ("prompt", self.prefill_tokens),
            ("generated", self.decode_tokens[1]),
        ):
            if tokens:
                parts.append(f"{_count(tokens)} {label} tokens")
        if self.decode_tokens[2] > self.decode_tokens[1]:
            parts[-1] += f" (at most {_count(self.decode_tokens[2])})"
        return ", ".join(parts) or "no model work known"


def model_work(model: str | None, *, quantized: bool = False, **fields: Any) -> Work:
    """A Work for `model`: its parameters and shape from its config.json (local or the Hub's), else from the size in
    its name; unknown when neither says."""
    if not model:
        return Work(**fields)
    from ow_prefect.jobs.vram import model_size

    size = model_size(model)
    if size is None:
        return Work(model=model, notes=[f"{model}: size unknown (no config.json, no size in its name)"], **fields)
    params, text_config = size
    return Work(
        model=model,
        params=float(params),
        text_config=text_config,
        weight_bytes=params * (0.56 if quantized else 2.0),
        **fields,
    )


@dataclass(frozen=True)
class FileTokens:
    rows: int | None
    tokens: float  # every row whole
    capped: float  # each row cut at the cap given

    @property
    def per_row(self) -> float:
        return self.tokens / self.rows if self.rows else self.tokens


def file_tokens(storage: Any, file_id: str, cap: int | None = None) -> FileTokens:
    """Rows and tokens of a stored JSONL file (bytes / bytes_per_token per row); each row cut at `cap` tokens in
    `capped`. A file over MAX_READ_BYTES is not read: its tokens come from its size, uncut."""
    per_token = table().scaling["bytes_per_token"]
    record = storage.info(file_id)
    if record.kind != "file" or record.bytes > MAX_READ_BYTES:
        tokens = record.bytes / per_token
        return FileTokens(None, tokens, tokens)
    lines = [line for line in storage.get_bytes(file_id).splitlines() if line.strip()]
    sizes = [len(line) / per_token for line in lines]
    return FileTokens(len(lines), sum(sizes), sum(min(size, cap) for size in sizes) if cap else sum(sizes))


def generation(rows: float, max_tokens: int, n: int = 1, typical: float | None = None) -> tuple[float, float, float]:
    """Generated tokens for `rows` prompts × `n`: (few, expected, many). A completion stops at its end of turn,
    typically well before `max_tokens`: `typical` tokens (default half of max_tokens), a quarter of that at the
    short end, `max_tokens` at the long end."""
    typical = min(max_tokens, typical if typical is not None else max_tokens / 2)
    count = rows * n
    return (count * typical / 2, count * typical, count * max_tokens)


def _count(tokens: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:.0f}"

"""What a researcher watches while training runs: logprobs of chosen datasets, and sampled completions.

Both are trainer callbacks that run only at their steps (step 0, every N steps, and the last step), in eval
mode without gradients, and hand what they computed to a `Sink`: the flow's stores result files and emits
Prefect events (reporting.PrefectSink), the command line's writes local files (LocalSink). No Prefect here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Protocol

from transformers import TrainerCallback

from flows.finetune import logprobs
from flows.finetune.data import jsonl_bytes, read_jsonl, turn_context

Every = int | Literal["log"]


class Sink(Protocol):
    def logprobs(self, tag: str, step: int, loss: float | None, rows: list[dict[str, Any]]) -> None: ...

    def samples(self, tag: str, step: int, rows: list[dict[str, Any]]) -> None: ...


def due(step: int, every: Every, max_steps: int) -> bool:
    """Step 0, the last step, and every `every` steps between — or, for "log", steps 1-9, 10, 20, ..., 100, 200, ..."""
    if step == 0 or step == max_steps:
        return True
    if every == "log":
        every = 10 ** int(math.log10(step))
    return step % every == 0


def result_name(kind: str, tag: str, step: int) -> str:
    """Where a callback's file goes in the job's results (job.download keeps these paths)."""
    return f"{kind}/{tag}/step-{step:06d}.jsonl"


class StepCallback(TrainerCallback):
    """Run `measure(model, step)` at step 0 (or the step a resumed run starts at) and whenever `due`."""

    def __init__(self, every: Every):
        self.every = every
        self.done: set[int] = set()

    def measure(self, model: Any, step: int) -> None:
        raise NotImplementedError

    def _maybe(self, state, model) -> None:
        if state.global_step not in self.done and due(state.global_step, self.every, state.max_steps):
            self.done.add(state.global_step)
            self.measure(model, state.global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._maybe(state, model)


class LogprobTracker(StepCallback):
    """`logp_callback_datasets`: the mean per-token loss of each dataset, and its tokens' and blocks' logprobs."""

    def __init__(
        self,
        datasets: dict[str, Path],
        tokenizer: Any,
        sink: Sink,
        *,
        every: Every,
        batch_size: int,
        responses_only: bool,
    ):
        super().__init__(every)
        self.tokenizer, self.sink, self.batch_size = tokenizer, sink, batch_size
        self.datasets = {}  # tag -> (rows, their encodings): rendered and tokenized once, scored at every step
        for tag, path in datasets.items():
            rows = read_jsonl(path)
            self.datasets[tag] = (rows, [logprobs.encode(tokenizer, row, responses_only) for row in rows])

    def measure(self, model: Any, step: int) -> None:
        for tag, (rows, encoded) in self.datasets.items():
            scored = logprobs.score(model, self.tokenizer, rows, self.batch_size, with_tokens=True, encoded=encoded)
            self.sink.logprobs(tag, step, scored.loss, scored.rows)


def prompt_text(tokenizer: Any, row: dict[str, Any]) -> str:
    """The prompt of a sample: the text an assistant turn after the row's messages is trained after (for Qwen3
    the empty think scaffold is in it, as in non-thinking mode); a trailing assistant message is a prefix the
    completion continues."""
    return turn_context(tokenizer, row["messages"])


def generate(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, batch_size: int, **sampling: Any) -> list[str]:
    """Completions of `rows` with transformers' generate (left-padded batches); temperature 0 is greedy."""
    temperature = sampling["temperature"]
    options = {
        "max_new_tokens": sampling["max_tokens"],
        "do_sample": temperature > 0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if temperature > 0:
        options.update(temperature=temperature, top_p=sampling.get("top_p", 1.0))
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    try:
        with logprobs.eval_mode(model):
            for offset in range(0, len(rows), batch_size):
                texts = [prompt_text(tokenizer, row) for row in rows[offset : offset + batch_size]]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                output = model.generate(**batch, **options)
                new = output[:, batch["input_ids"].shape[1] :]
                completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return completions


class Sampler(StepCallback):
    """One of `sampling_callbacks`: completions of a dataset's prompts every `eval_steps`."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, sink: Sink, spec: Any):
        super().__init__(spec.eval_steps)
        self.rows, self.tokenizer, self.sink, self.spec = rows, tokenizer, sink, spec

    def measure(self, model: Any, step: int) -> None:
        completions = generate(
            model,
            self.tokenizer,
            self.rows,
            batch_size=self.spec.batch_size,
            temperature=self.spec.temperature,
            max_tokens=self.spec.max_tokens,
        )
        rows = [{**row, "completion": completion} for row, completion in zip(self.rows, completions, strict=True)]
        self.sink.samples(self.spec.tag, step, rows)


def build(cfg: Any, tokenizer: Any, sink: Sink | None, paths: dict[str, Path]) -> list[TrainerCallback]:
    """The callbacks `cfg` asks for; `paths` maps each dataset's file id to where it was downloaded."""
    if sink is None:
        return []
    callbacks: list[TrainerCallback] = []
    if cfg.logp_callback_datasets:
        datasets = {tag: paths[file_id] for tag, file_id in cfg.logp_callback_datasets.items()}
        callbacks.append(
            LogprobTracker(
                datasets,
                tokenizer,
                sink,
                every=cfg.eval_every_n_steps,
                batch_size=cfg.eval_batch_size,
                responses_only=cfg.train_on_responses_only,
            )
        )
    for spec in cfg.sampling_callbacks:
        callbacks.append(Sampler(read_jsonl(paths[spec.dataset]), tokenizer, sink, spec))
    return callbacks


class LocalSink:
    """Writes the callbacks' files under a folder (``python -m flows.finetune.train``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.records: list[dict[str, Any]] = []

    def _write(self, kind: str, tag: str, step: int, rows: list[dict[str, Any]]) -> Path:
        path = self.folder / result_name(kind, tag, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jsonl_bytes(rows))
        return path

    def logprobs(self, tag: str, step: int, loss: float | None, rows: list[dict[str, Any]]) -> None:
        path = self._write("logprobs", tag, step, rows)
        self.records.append({"type": "logprobs", "tag": tag, "step": step, "value": loss, "file": str(path)})

    def samples(self, tag: str, step: int, rows: list[dict[str, Any]]) -> None:
        path = self._write("samples", tag, step, rows)
        self.records.append({"type": "samples", "tag": tag, "step": step, "file": str(path)})

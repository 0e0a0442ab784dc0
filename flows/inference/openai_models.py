"""OpenAI models in the `inference` flow (deployment `inference/openai`: no GPU, no vLLM environment).

The rows of the input file go to OpenAI either through its Batch API (`use_batch=True`: JSONL files of at most
50 000 requests / 200 MB each, polled until done, output and error files mapped back to rows by `custom_id`) or
through the chat client (`ow_prefect.chat`: its concurrency, retries with back-off and `Retry-After`, and its
disk cache for seeded requests). Either way the result file has the shape of a vLLM job's: each input row, in
input order, plus `completion` (a list when n > 1) and, when asked, `logprobs` in OpenAI's shape. A row that
OpenAI did not answer gets `completion: null` and an `error`; the job fails only when no row was answered.

The key comes from `openai_endpoint` (OPENAI_API_KEY, else the Secret block OW_OPENAI_KEY_SECRET) and lives
only in the OpenAI clients: never in a parameter, a log line, the result file or the job's outputs.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from flows._runtime import RESULT_PURPOSE, JobRun
from ow_prefect.chat.routing import Endpoint, openai_endpoint
from ow_prefect.jobs.inference import InferenceParams

CHAT_ENDPOINT = "/v1/chat/completions"
MAX_BATCH_REQUESTS = 50_000  # OpenAI's limits per batch input file
MAX_BATCH_BYTES = 200 * 1024**2
BATCH_FINAL = {"completed", "failed", "expired", "cancelled"}
BATCH_REUSABLE = {"validating", "in_progress", "finalizing", "completed"}  # a restart picks these up again
PROGRESS_SECONDS = 10.0


def request_body(cfg: InferenceParams, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request for one row: the job's parameters where OpenAI has them (the rest is refused when the
    parameters are validated). Values equal to OpenAI's defaults are left out, so models that accept only
    the default (reasoning models and temperature) are not refused for them."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_completion_tokens": cfg.max_tokens}
    if cfg.temperature != 1.0:
        body["temperature"] = cfg.temperature
    if cfg.top_p != 1.0:
        body["top_p"] = cfg.top_p
    if cfg.stop:
        body["stop"] = cfg.stop
    if cfg.n_completions_per_prompt > 1:
        body["n"] = cfg.n_completions_per_prompt
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    if cfg.logprobs is not None:
        body |= {"logprobs": True, "top_logprobs": cfg.logprobs}
    return body


def result_record(row: dict[str, Any], answer: dict[str, Any] | str, cfg: InferenceParams) -> dict[str, Any]:
    """The row plus what the vLLM runner writes (`completion`, `logprobs`), from a chat completion body; or the
    row with `completion: null` and the `error` when `answer` is one."""
    if isinstance(answer, str):
        return {**row, "completion": None, "error": answer}
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    texts = [choice["message"]["content"] for choice in choices]
    record = {**row, "completion": texts if cfg.n_completions_per_prompt > 1 else texts[0]}
    if cfg.logprobs is not None:
        per_choice = [token_logprobs(choice.get("logprobs")) for choice in choices]
        record["logprobs"] = per_choice if cfg.n_completions_per_prompt > 1 else per_choice[0]
    return record


def token_logprobs(logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """OpenAI's `choice.logprobs.content`, trimmed to the runner's keys (`token`, `logprob`, `top_logprobs`)."""
    return [
        {
            "token": position["token"],
            "logprob": round(position["logprob"], 6),
            "top_logprobs": [
                {"token": t["token"], "logprob": round(t["logprob"], 6)} for t in position["top_logprobs"]
            ],
        }
        for position in (logprobs or {}).get("content") or []
    ]


def run_openai(job: JobRun, cfg: InferenceParams, work: Path) -> dict[str, Any]:
    """Answer every row of the input with OpenAI, store the result file; the job's outputs."""
    logger = get_run_logger()
    started = time.monotonic()
    input_path = job.storage.download(cfg.input_file_id, work / "input.jsonl")
    rows = [json.loads(line) for line in input_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    endpoint = openai_endpoint(cfg.model)
    model = endpoint.model if cfg.use_batch else cfg.model  # the chat client routes by the full name
    requests = [request_body(cfg, model, row["messages"]) for row in rows]
    route = "Batch API" if cfg.use_batch else "chat client"
    logger.info("OpenAI %s (%s): %s rows", endpoint.model, route, len(rows))
    if cfg.use_batch:
        batches = OpenAIBatches(job, endpoint, logger)
        answers = batches.run(requests)
    else:
        batches = None
        answers = chat_answers(requests, logger)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    failed = 0
    with (work / "output.jsonl").open("w", encoding="utf-8") as out:
        for row, answer in zip(rows, answers, strict=True):
            failed += isinstance(answer, str)
            for key in usage:
                usage[key] += 0 if isinstance(answer, str) else (answer.get("usage") or {}).get(key) or 0
            out.write(json.dumps(result_record(row, answer, cfg), ensure_ascii=False) + "\n")
    if rows and failed == len(rows):
        first = next(answer for answer in answers if isinstance(answer, str))
        raise RuntimeError(f"OpenAI answered none of the {len(rows)} rows; the first error: {first}")
    result = job.storage.put_path(work / "output.jsonl", RESULT_PURPOSE)
    if failed:
        logger.warning("%s of %s rows failed: see their 'error' in %s", failed, len(rows), result.id)
    outputs = {
        "result_file": result.id,
        "rows": len(rows),
        "failed_rows": failed,
        "generated_tokens": usage["completion_tokens"],
        "prompt_tokens": usage["prompt_tokens"],
        "seconds": round(time.monotonic() - started, 1),
    }
    if batches is not None:
        outputs["openai_batches"] = batches.batch_ids
    return outputs


def chat_answers(requests: list[dict[str, Any]], logger: Any) -> list[dict[str, Any] | str]:
    """Every request through the chat client's engine (answers in input order; a failure is its message)."""
    from ow_prefect.chat.cache import ChatCache
    from ow_prefect.chat.engine import ChatEngine, ChatFailure
    from ow_prefect.settings import get_settings

    settings = get_settings()
    cache = ChatCache(
        Path(settings.chat_cache_dir or settings.home_dir / "chat-cache").expanduser(), settings.chat_cache_gb
    )
    answers: list[Any] = [None] * len(requests)
    progress = {"done": 0, "logged": time.monotonic()}

    def on_result(index: int, answer: Any) -> None:
        answers[index] = chat_error(answer.error) if isinstance(answer, ChatFailure) else answer.model_dump(mode="json")
        progress["done"] += 1
        if time.monotonic() - progress["logged"] > PROGRESS_SECONDS:
            progress["logged"] = time.monotonic()
            logger.info("progress: %s/%s rows", progress["done"], len(requests))

    async def run() -> None:
        engine = ChatEngine(None, cache)  # no `ow`: OpenAI models are never deployed
        try:
            await engine.batch(iter(requests), progress=False, on_result=on_result)
        finally:
            await engine.aclose(down=False)
            cache.close()

    asyncio.run(run())
    return answers


class BatchesCancelled(Exception):
    """The flow run was cancelled while its OpenAI batches ran; they are cancelled (the flow ends Cancelled)."""


class OpenAIBatches:
    """The job's rows through OpenAI's Batch API. The ids of the batches it creates are stored under the job
    (`openai-batches/<job id>.json`) the moment they exist, so a restarted run picks up batches that are still
    running or completed instead of paying for them again; a run that is cancelled or dies cancels them."""

    def __init__(self, job: JobRun, endpoint: Endpoint, logger: Any):
        import openai

        self.job = job
        self.logger = logger
        self.client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=5)
        self.state_key = f"openai-batches/{job.id}.json"
        self.batch_ids: list[str] = []

    def run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
        chunks = batch_files(requests)
        known = self._known()
        try:
            for index, (start, content) in enumerate(chunks):
                self.batch_ids.append(self._reuse(known.get(str(index))) or self._submit(index, start, content))
                self.job.storage.put_json(self.state_key, {str(i): b for i, b in enumerate(self.batch_ids)})
            final = self._wait()
        except BaseException:  # cancelled (SIGTERM, Ctrl-C), crashed or failed: stop paying for the rest
            self._cancel()
            raise
        answers: list[dict[str, Any] | str] = [
            unanswered(batch)
            for (_, content), batch in zip(chunks, final, strict=True)
            for _ in range(content.count(b"\n"))
        ]
        for batch in final:
            self._collect(batch, answers)
        return answers

    def _known(self) -> dict[str, str]:
        from ow_prefect.errors import NotFoundError

        try:
            return self.job.storage.get_json(self.state_key)
        except NotFoundError:
            return {}

    def _reuse(self, batch_id: str | None) -> str | None:
        import openai

        if batch_id is None:
            return None
        try:
            batch = self.client.batches.retrieve(batch_id)
        except openai.NotFoundError:
            return None
        if batch.status not in BATCH_REUSABLE:
            return None
        self.logger.info("OpenAI batch %s (%s) of an earlier attempt: picked up again", batch.id, batch.status)
        return batch.id

    def _submit(self, index: int, start: int, content: bytes) -> str:
        uploaded = self.client.files.create(file=(f"{self.job.id}-{index}.jsonl", content), purpose="batch")
        batch = self.client.batches.create(
            input_file_id=uploaded.id,
            endpoint=CHAT_ENDPOINT,
            completion_window="24h",
            metadata={"ow_job": self.job.id, "first_row": str(start)},
        )
        self.logger.info("OpenAI batch %s: rows %s-%s submitted", batch.id, start, start + content.count(b"\n") - 1)
        return batch.id

    def _wait(self) -> list[Any]:
        from ow_prefect.settings import get_settings

        interval = get_settings().openai_batch_poll_seconds
        seen: dict[str, tuple] = {}
        while True:
            batches = [self.client.batches.retrieve(batch_id) for batch_id in self.batch_ids]
            for batch in batches:
                counts = batch.request_counts
                status = (batch.status, counts.completed if counts else 0, counts.failed if counts else 0)
                if seen.get(batch.id) != status:
                    seen[batch.id] = status
                    self.logger.info("OpenAI batch %s: %s, %s done, %s failed", batch.id, *status)
            if all(batch.status in BATCH_FINAL for batch in batches):
                return batches
            if self._cancelled():
                raise BatchesCancelled("the flow run was cancelled: its OpenAI batches were cancelled too")
            time.sleep(interval)

    def _cancelled(self) -> bool:
        """Whether the flow run is being cancelled. A worker's supervisor ends a cancelled run with SIGTERM (the
        `except` in `run` cancels the batches then); an embedded run has no supervisor, so this poll notices."""
        if self.job.flow_run is None:
            return False
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(self.job.flow_run.id).state
        return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)

    def _cancel(self) -> None:
        for batch_id in self.batch_ids:
            try:
                batch = self.client.batches.retrieve(batch_id)
                if batch.status not in BATCH_FINAL and batch.status != "cancelling":
                    self.client.batches.cancel(batch_id)
                    self.logger.info("OpenAI batch %s cancelled", batch_id)
            except Exception as error:  # best effort: the run is ending anyway; say which batch may still run
                self.logger.warning("could not cancel OpenAI batch %s: %s", batch_id, type(error).__name__)

    def _collect(self, batch: Any, answers: list[dict[str, Any] | str]) -> None:
        """Each line of the batch's output and error files, into the answer of the row its `custom_id` names."""
        if batch.status != "completed":
            self.logger.error("OpenAI batch %s ended: %s", batch.id, unanswered(batch))
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self.client.files.content(file_id).text.splitlines():
                if line.strip():
                    record = json.loads(line)
                    answers[int(record["custom_id"].removeprefix("row-"))] = batch_answer(record)
        if batch.status in BATCH_FINAL:
            self._delete_input(batch)

    def _delete_input(self, batch: Any) -> None:
        """The uploaded requests stay in the OpenAI organisation's storage otherwise (OpenWeights left them)."""
        import openai

        try:
            self.client.files.delete(batch.input_file_id)
        except openai.NotFoundError:  # deleted by the attempt that first collected this batch
            pass
        except Exception as error:
            self.logger.warning("could not delete OpenAI file %s: %s", batch.input_file_id, type(error).__name__)


def unanswered(batch: Any) -> str:
    """The error of a row that has no line in its batch's output or error file."""
    errors = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data if batch.errors else None) or [])
    return f"no answer from OpenAI batch {batch.id} (status {batch.status}{': ' + errors if errors else ''})"


def batch_answer(record: dict[str, Any]) -> dict[str, Any] | str:
    """One line of a batch's output or error file: the chat completion body, or what went wrong."""
    response = record.get("response") or {}
    if response.get("status_code") == 200:
        return response["body"]
    return error_text(response.get("status_code"), record.get("error") or (response.get("body") or {}).get("error"))


def chat_error(error: BaseException) -> str:
    """A failed chat request, worded like a batch's error line (same result file whichever route)."""
    body = getattr(error, "body", None)
    if isinstance(body, dict) and getattr(error, "status_code", None):
        return error_text(error.status_code, body.get("error", body))
    return f"{type(error).__name__}: {error}"


def error_text(status: int | None, error: dict[str, Any] | None) -> str:
    """`<HTTP status> <OpenAI's error code or type>: <its message>`."""
    error = error or {}
    prefix = f"{status} " if status else ""
    return f"{prefix}{error.get('code') or error.get('type') or 'error'}: {error.get('message') or 'no message'}"


def batch_files(requests: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    """(first row, JSONL content) per batch: at most MAX_BATCH_REQUESTS lines and MAX_BATCH_BYTES each; line i
    of the job is `custom_id` `row-<i>`."""
    chunks: list[tuple[int, bytes]] = []
    lines: list[bytes] = []
    size, start = 0, 0
    for index, body in enumerate(requests):
        line = json.dumps({"custom_id": f"row-{index}", "method": "POST", "url": CHAT_ENDPOINT, "body": body})
        encoded = (line + "\n").encode()
        if lines and (len(lines) >= MAX_BATCH_REQUESTS or size + len(encoded) > MAX_BATCH_BYTES):
            chunks.append((start, b"".join(lines)))
            lines, size, start = [], 0, index
        lines.append(encoded)
        size += len(encoded)
    if lines:
        chunks.append((start, b"".join(lines)))
    return chunks

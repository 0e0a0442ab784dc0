"""Validation of dataset files before anything is stored or rented.

Every problem in a file is collected and reported at once, each as ``line N: field.path: what is wrong``.
Keys a message or a content block does not use are ignored, as OpenWeights ignores them, with one warning per
file naming them (a typo such as ``wieght`` shows there).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from typing import Any

from ow_prefect.errors import DatasetValidationError

ROLES = ("system", "user", "assistant")
BLOCK_KEYS = {"type", "text", "weight", "tag"}
MESSAGE_KEYS = {"role", "content", "name", "weight"}
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
# OpenWeights' names for a purpose -> ours (its DPO cookbook uploads with purpose="preferences")
PURPOSE_ALIASES = {"preferences": "preference"}


class IgnoredKeysWarning(UserWarning):
    """A dataset has keys on its messages or content blocks that nothing reads."""


class _Ignored:
    """Unknown keys seen while validating one file: `(where, key)` -> the lines they are on."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.line = 0

    def add(self, where: str, keys: set[str]) -> None:
        for key in keys:
            self.lines[(where, key)].append(self.line)

    def warn(self, source: str) -> None:
        if not self.lines:
            return
        found = "; ".join(
            f"{key!r} on {where}s ({len(lines)} line(s), first line {lines[0]})"
            for (where, key), lines in sorted(self.lines.items())
        )
        warnings.warn(
            f"{source}: ignored unknown key(s): {found}. A message uses role, content, name and weight; a content "
            "block uses type, text, weight and tag.",
            IgnoredKeysWarning,
            stacklevel=4,
        )


def canonical_purpose(purpose: str) -> str:
    """`purpose` under ow_prefect's name (OpenWeights' ``preferences`` is ``preference``)."""
    return PURPOSE_ALIASES.get(purpose, purpose)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _block_problems(block: Any, path: str, ignored: _Ignored) -> list[str]:
    if not isinstance(block, dict):
        return [f'{path}: expected a content block object like {{"type": "text", "text": "..."}}']
    problems = []
    ignored.add("block", set(block) - BLOCK_KEYS)
    if block.get("type", "text") != "text":  # OpenWeights reads a block without a type as text
        problems.append(f'{path}.type: expected "text", got {json.dumps(block.get("type"))}')
    if not isinstance(block.get("text"), str):
        problems.append(f"{path}.text: expected a string")
    if "weight" in block and not _is_number(block["weight"]):
        problems.append(f"{path}.weight: expected a finite number")
    if "tag" in block and not isinstance(block["tag"], str):
        problems.append(f"{path}.tag: expected a string")
    return problems


def _message_problems(message: Any, path: str, ignored: _Ignored) -> list[str]:
    if not isinstance(message, dict):
        return [f"{path}: expected a message object with role and content"]
    problems = []
    ignored.add("message", set(message) - MESSAGE_KEYS)
    if "weight" in message and not _is_number(message["weight"]):
        problems.append(f"{path}.weight: expected a finite number (the weight of the message's blocks)")
    if message.get("role") not in ROLES:
        problems.append(f"{path}.role: expected one of {list(ROLES)}, got {json.dumps(message.get('role'))}")
    if "content" not in message:
        problems.append(f"{path}.content: missing")
    else:
        content = message["content"]
        if isinstance(content, list):
            if not content:
                problems.append(f"{path}.content: empty list; give at least one text block")
            for i, block in enumerate(content):
                problems += _block_problems(block, f"{path}.content[{i}]", ignored)
        elif not isinstance(content, str):
            problems.append(f"{path}.content: expected a string or a list of text blocks")
    return problems


def _messages_problems(messages: Any, path: str, ignored: _Ignored) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{path}: expected a non-empty list of messages"]
    problems = []
    for i, message in enumerate(messages):
        problems += _message_problems(message, f"{path}[{i}]", ignored)
    return problems


def _conversation_problems(row: dict[str, Any], ignored: _Ignored) -> list[str]:
    has_messages, has_text = "messages" in row, "text" in row
    if has_messages and has_text:
        return ["row: has both 'messages' and 'text'; keep one"]
    if has_messages:
        return _messages_problems(row["messages"], "messages", ignored)
    if has_text:
        return [] if isinstance(row["text"], str) and row["text"] else ["text: expected a non-empty string"]
    return ["row: expected a 'messages' list or a 'text' string"]


def _preference_problems(row: dict[str, Any], ignored: _Ignored) -> list[str]:
    problems = []
    for field in PREFERENCE_FIELDS:
        if field not in row:
            problems.append(f"{field}: missing; a preference row has prompt, chosen and rejected message lists")
        else:
            problems += _messages_problems(row[field], field, ignored)
    return problems


ROW_CHECKS = {"conversations": _conversation_problems, "preference": _preference_problems}


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def dataset_problems(data: bytes, purpose: str, ignored: _Ignored | None = None) -> tuple[int, list[str]]:
    """Return (number of rows, every problem found) for a JSONL dataset of the given purpose; unknown keys of
    messages and blocks go to `ignored`."""
    check = ROW_CHECKS[canonical_purpose(purpose)]
    ignored = ignored or _Ignored()
    lines = _lines(data)
    if not lines:
        return 0, ["file: empty; a dataset needs at least one JSON line"]
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        ignored.line = number
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"line {number}: invalid UTF-8 at byte {exc.start} of the line; save the file as UTF-8")
            continue
        if not text.strip():
            problems.append(f"line {number}: blank line; only trailing blank lines are allowed")
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: invalid JSON at column {exc.colno}: {exc.msg}")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {number}: expected a JSON object, got {type(row).__name__}")
            continue
        problems += [f"line {number}: {p}" for p in check(row, ignored)]
    return len(lines), problems


def validate_dataset(data: bytes, purpose: str, *, source: str = "file", max_bytes: int | None = None) -> int:
    """Validate `data` for `purpose`; return the number of rows or raise one error listing every problem (and
    warn once about keys that will be ignored)."""
    purpose = canonical_purpose(purpose)
    if max_bytes is not None and len(data) > max_bytes:
        raise DatasetValidationError(
            source,
            purpose,
            [f"file: {len(data)} bytes is over the limit of {max_bytes} bytes; split it or raise OW_MAX_FILE_MB"],
        )
    if purpose not in ROW_CHECKS:
        if not data:
            raise DatasetValidationError(source, purpose, ["file: empty"])
        return 0
    ignored = _Ignored()
    rows, problems = dataset_problems(data, purpose, ignored)
    if problems:
        raise DatasetValidationError(source, purpose, problems)
    ignored.warn(source)
    return rows

"""Validation of dataset files before anything is stored or rented.

Every problem in a file is collected and reported at once, each as ``line N: field.path: what is wrong``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ow_prefect.errors import DatasetValidationError

ROLES = ("system", "user", "assistant")
BLOCK_KEYS = {"type", "text", "weight", "tag"}
MESSAGE_KEYS = {"role", "content", "name"}
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
VALIDATED_PURPOSES = ("conversations", "preference")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _block_problems(block: Any, path: str) -> list[str]:
    if not isinstance(block, dict):
        return [f'{path}: expected a content block object like {{"type": "text", "text": "..."}}']
    problems = []
    unknown = sorted(set(block) - BLOCK_KEYS)
    if unknown:
        problems.append(f"{path}: unknown key(s) {unknown}; a block has only type, text, weight, tag")
    if block.get("type") != "text":
        problems.append(f'{path}.type: expected "text", got {json.dumps(block.get("type"))}')
    if not isinstance(block.get("text"), str):
        problems.append(f"{path}.text: expected a string")
    if "weight" in block and not _is_number(block["weight"]):
        problems.append(f"{path}.weight: expected a finite number")
    if "tag" in block and not isinstance(block["tag"], str):
        problems.append(f"{path}.tag: expected a string")
    return problems


def _message_problems(message: Any, path: str) -> list[str]:
    if not isinstance(message, dict):
        return [f"{path}: expected a message object with role and content"]
    problems = []
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        problems.append(f"{path}: unknown key(s) {unknown}; a message has role, content and optionally name")
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
                problems += _block_problems(block, f"{path}.content[{i}]")
        elif not isinstance(content, str):
            problems.append(f"{path}.content: expected a string or a list of text blocks")
    return problems


def _messages_problems(messages: Any, path: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{path}: expected a non-empty list of messages"]
    problems = []
    for i, message in enumerate(messages):
        problems += _message_problems(message, f"{path}[{i}]")
    return problems


def _conversation_problems(row: dict[str, Any]) -> list[str]:
    has_messages, has_text = "messages" in row, "text" in row
    if has_messages and has_text:
        return ["row: has both 'messages' and 'text'; keep one"]
    if has_messages:
        return _messages_problems(row["messages"], "messages")
    if has_text:
        return [] if isinstance(row["text"], str) and row["text"] else ["text: expected a non-empty string"]
    return ["row: expected a 'messages' list or a 'text' string"]


def _preference_problems(row: dict[str, Any]) -> list[str]:
    problems = []
    for field in PREFERENCE_FIELDS:
        if field not in row:
            problems.append(f"{field}: missing; a preference row has prompt, chosen and rejected message lists")
        else:
            problems += _messages_problems(row[field], field)
    return problems


ROW_CHECKS = {"conversations": _conversation_problems, "preference": _preference_problems}


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def dataset_problems(data: bytes, purpose: str) -> tuple[int, list[str]]:
    """Return (number of rows, every problem found) for a JSONL dataset of the given purpose."""
    check = ROW_CHECKS[purpose]
    lines = _lines(data)
    if not lines:
        return 0, ["file: empty; a dataset needs at least one JSON line"]
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
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
        problems += [f"line {number}: {p}" for p in check(row)]
    return len(lines), problems


def validate_dataset(data: bytes, purpose: str, *, source: str = "file", max_bytes: int | None = None) -> int:
    """Validate `data` for `purpose`; return the number of rows or raise one error listing every problem."""
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
    rows, problems = dataset_problems(data, purpose)
    if problems:
        raise DatasetValidationError(source, purpose, problems)
    return rows

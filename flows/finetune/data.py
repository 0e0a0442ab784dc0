"""Training data: JSONL rows (validated by ow_prefect.datasets) -> datasets the TRL trainers take.

SFT rows are tokenized here, with an `assistant_masks` column computed from the chat template itself
(render the conversation up to each assistant turn and up to its end; the characters between are the
assistant's), so responses-only training works with any prefix-stable template — no generation markers needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    """`rows` as JSON lines (what read_jsonl reads back), for a result file."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def flatten(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Content blocks -> one string per message (block weights and tags matter only to weighted SFT)."""
    return [
        {
            "role": m["role"],
            "content": m["content"] if isinstance(m["content"], str) else "".join(b["text"] for b in m["content"]),
        }
        for m in messages
    ]


def prepare_tokenizer(tokenizer: Any, chat_template: str) -> Any:
    """A pad token and a chat template are needed; fill them in when the model has none."""
    if chat_template != "default":
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


class TemplateError(ValueError):
    pass


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True)
        end_text = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns follow, so assistant "
                "tokens cannot be located; set train_on_responses_only=False or pass a chat_template"
            )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def tokenize_sft_row(tokenizer: Any, row: dict[str, Any], responses_only: bool) -> dict[str, list[int]]:
    if "text" in row:
        encoded = tokenizer(row["text"] + (tokenizer.eos_token or ""), add_special_tokens=False)
        return {"input_ids": encoded["input_ids"], "assistant_masks": [1] * len(encoded["input_ids"])}
    messages = flatten(row["messages"])
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not responses_only:
        mask = [1] * len(encoded["input_ids"])
    else:
        mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoded["offset_mapping"]]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


def sft_dataset(path: str | Path, tokenizer: Any, responses_only: bool):
    from datasets import Dataset

    rows = [tokenize_sft_row(tokenizer, row, responses_only) for row in read_jsonl(path)]
    return Dataset.from_list(rows)


def preference_dataset(path: str | Path):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"prompt": flatten(row["prompt"]), "chosen": flatten(row["chosen"]), "rejected": flatten(row["rejected"])}
            for row in read_jsonl(path)
        ]
    )

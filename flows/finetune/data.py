"""Training data: JSONL rows (validated by ow_prefect.datasets) -> datasets the TRL trainers take.

A conversation is rendered once with its chat template and tokenized once. Where each message's content (and
each content block) sits in that text is found from the template itself: render the same conversation again
with a sentinel in place of (the start of) one content and see where the two texts part. Every probe keeps
the whole conversation, so templates that render a message differently depending on what follows (Qwen3
drops earlier reasoning and adds an empty think scaffold to the last turn only; OLMo ends the last turn with
its eos token, earlier ones with <|im_end|>) are located as they are, with no `{% generation %}` markers.

Responses-only SFT trains each assistant turn's content plus its end-of-turn markup — the text after the
content through the first special token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...), not the
newline after it — and never the turn's header or a template scaffold before the content (Qwen3's empty
`<think>\\n\\n</think>\\n\\n`): the tokens the model has to produce itself. Each turn trains after exactly the
text the model is given to generate it: where the row renders a turn otherwise than the conversation cut after
that turn (Qwen3's earlier turns), the cut conversation is a training example of its own (see `examples`).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SENTINEL = "\ue000ow-content\ue000"  # a private-use character: no text has it, `tojson` keeps it
TEMPLATE_FIX = (
    "pass chat_template= a Jinja template that renders the messages in order with their content unchanged "
    "(ChatML, for one)"
)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    """`rows` as JSON lines (what read_jsonl reads back), for a result file."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def content_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string is one text block)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b) for b in content]


def flatten(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Content blocks -> one string per message (block weights and tags matter only to weighted SFT)."""
    return [{"role": m["role"], "content": "".join(b["text"] for b in content_blocks(m["content"]))} for m in messages]


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


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (a binary search over C-speed slice comparisons)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def block_bounds(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, which: Collection[int] | None = None
) -> tuple[list[list[int] | None], set[int]]:
    """For each message (of `which`, by default all; the others get None), the positions in `text` (the rendered
    conversation) where its content starts, where each of its blocks after the first starts, and where its
    content ends; and the messages the template leaves out (all their bounds where the content before them
    ends). Bound j is where `text` parts from the conversation rendered with the sentinel after the message's
    first j blocks; when the content stands verbatim after bound 0, the other bounds follow from the blocks'
    lengths."""
    flat = flatten(messages)

    def parting(i: int, content: str) -> int | None:
        probe = render(tokenizer, [*flat[:i], {**flat[i], "content": content + SENTINEL}, *flat[i + 1 :]])
        return _common_prefix(text, probe) if SENTINEL in probe else None

    bounds: list[list[int] | None] = []
    left_out: set[int] = set()
    floor = 0
    for i, message in enumerate(messages):
        if which is not None and i not in which:
            bounds.append(None)
            continue
        texts = [b["text"] for b in content_blocks(message["content"])]
        start = parting(i, "")
        if start is None:
            found = [floor] * (len(texts) + 1)
            left_out.add(i)
        elif text.startswith(flat[i]["content"], start):
            found = [start] + [start + len("".join(texts[: j + 1])) for j in range(len(texts))]
        else:
            found = [start] + [parting(i, "".join(texts[: j + 1])) for j in range(len(texts))]
        if found[0] < floor or None in found or found != sorted(found):
            raise TemplateError(
                f"the chat template renders message {i} ({message['role']}) so that its place in the text "
                f"depends on more than its own content, so its tokens cannot be located; {TEMPLATE_FIX}"
            )
        floor = found[-1]
        bounds.append(found)
    return bounds, left_out


@dataclass
class Rendered:
    """One row as text and tokens, with where each message's content blocks and end-of-turn markup sit."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # each token's character span in `text`
    # per message: content start, block boundaries, content end (see block_bounds); None for a message not
    # located, or one this rendering does not train (see `examples`)
    bounds: list[list[int] | None]
    tails: list[tuple[int, int] | None]  # per message: its end-of-turn markup (empty where it has none)
    left_out: set[int] = field(default_factory=set)  # the messages the template does not render


def owners(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int | None]:
    """For each token (its character span), the index of the first of `spans` (the non-empty ones in text order,
    not overlapping) it covers a character of, or None. A zero-width token stands for its first character."""
    kept = [(start, end, i) for i, (start, end) in enumerate(spans) if start < end]
    ends = [end for _, end, _ in kept]
    found: list[int | None] = []
    for start, end in offsets:
        k = bisect.bisect_right(ends, start)  # the first span ending after the token starts
        found.append(kept[k][2] if k < len(kept) and kept[k][0] < max(end, start + 1) else None)
    return found


def turn_tails(tokenizer: Any, rendered: Rendered) -> list[tuple[int, int] | None]:
    """Each located message's end-of-turn markup: from its content's end through the first special (or added)
    token before the next located message's content, e.g. `<|im_end|>` of `<|im_end|>\\n<|im_start|>user\\n`.
    A template with no such token there ends the turn at the first line break; a message it leaves out has
    none."""
    markup_ids = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    markup = [span for token, span in zip(rendered.input_ids, rendered.offsets, strict=True) if token in markup_ids]
    starts = [start for start, _ in markup]
    shown = [i for i, bounds in enumerate(rendered.bounds) if bounds is not None and i not in rendered.left_out]
    tails = [None if bounds is None else (bounds[-1], bounds[-1]) for bounds in rendered.bounds]
    for i, following in zip(shown, [*shown[1:], None], strict=True):
        start = rendered.bounds[i][-1]
        stop = len(rendered.text) if following is None else rendered.bounds[following][0]
        first = bisect.bisect_left(starts, start)
        if first < len(markup) and markup[first][0] < stop:
            tails[i] = (start, markup[first][1])
        else:
            line_break = rendered.text.find("\n", start, stop)
            tails[i] = (start, start if line_break < 0 else line_break)
    return tails


def tokenized(
    tokenizer: Any, text: str, bounds: list[list[int] | None] | None = None, left_out: set[int] = frozenset()
) -> Rendered:
    """`text` tokenized, with the messages' `bounds` (from block_bounds) and their end-of-turn markup."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    rendered = Rendered(text, encoded["input_ids"], offsets, bounds or [], [], set(left_out))
    if bounds:
        rendered.tails = turn_tails(tokenizer, rendered)
    return rendered


def render_row(tokenizer: Any, row: dict[str, Any], locate: bool = True) -> Rendered:
    """Render and tokenize a "messages" or "text" row; `locate`: find its blocks and end-of-turn markup too
    (a "text" row is one block, its end of turn the eos token)."""
    if "text" in row:
        rendered = tokenized(tokenizer, row["text"] + (tokenizer.eos_token or ""))
        rendered.bounds, rendered.tails = [[0, len(row["text"])]], [(len(row["text"]), len(rendered.text))]
        return rendered
    text = render(tokenizer, flatten(row["messages"]))
    if not locate:
        return tokenized(tokenizer, text)
    return tokenized(tokenizer, text, *block_bounds(tokenizer, row["messages"], text))


@dataclass
class Example:
    """What one training example trains: a row, or its conversation cut after an assistant turn (`row`), as
    rendered, with its located messages the ones it trains (see `examples`)."""

    row: dict[str, Any]
    rendered: Rendered


def examples(tokenizer: Any, row: dict[str, Any], responses_only: bool, locate: bool = True) -> list[Example]:
    """The examples a row trains as. Responses only, each assistant turn is trained after the text the model
    sees when it generates that turn, and as the text it then writes: as the turn renders in the conversation
    cut after it. A turn the whole row renders the same way (every turn of a prefix-stable template: Qwen2.5,
    Llama 3, Gemma 3, Mistral, OLMo) trains in the row. A turn the row renders otherwise before or through its
    content (Qwen3 writes an earlier turn with no think scaffold before it, and drops its reasoning) does not
    train there: the conversation cut after it is one more example, which trains that turn alone (placed
    before the row). Otherwise (`responses_only` off, "text" rows) the row is the one example; `locate` as
    render_row's."""
    rendered = render_row(tokenizer, row, locate=locate or responses_only)
    if not responses_only or "text" in row:
        return [Example(row, rendered)]
    messages, moved = row["messages"], []
    for i, message in enumerate(messages[:-1]):  # the conversation cut after the last message is the row
        if message["role"] == "assistant":
            own = _cut_after(tokenizer, row, rendered, i)
            if own is not None:
                rendered.bounds[i] = rendered.tails[i] = None
                moved.append(own)
    return [*moved, Example(row, rendered)]


def _cut_after(tokenizer: Any, row: dict[str, Any], rendered: Rendered, i: int) -> Example | None:
    """The conversation cut after assistant turn i as an example that trains turn i, or None where the row
    renders the turn as the cut conversation does. One render where the row's text is the cut conversation's
    through the turn's content (through its end of turn, for an empty one); otherwise one more, to locate the
    turn there, and a tokenization."""
    cut = flatten(row["messages"][: i + 1])
    text = render(tokenizer, cut)
    in_row = rendered.bounds[i]
    through = in_row[-1] if in_row[-1] > in_row[0] else rendered.tails[i][1]
    if i not in rendered.left_out and text.startswith(rendered.text[:through]):
        return None
    bounds, left_out = block_bounds(tokenizer, row["messages"][: i + 1], text, which={i})
    if i in left_out or (
        i not in rendered.left_out and bounds[i] == in_row and text[: in_row[-1]] == rendered.text[: in_row[-1]]
    ):
        return None  # an empty turn whose end of turn alone differs, or one with nothing to train when cut
    return Example({**row, "messages": row["messages"][: i + 1]}, tokenized(tokenizer, text, bounds, left_out))


def turn_context(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The text an assistant turn after `messages` is trained after (see `examples`): the conversation with one
    more assistant turn, cut where that turn's content starts — after Qwen3's empty think scaffold, say. A
    trailing assistant message is the start of that turn: the text runs through it as the template renders it."""
    if messages[-1]["role"] != "assistant":
        messages = [*messages, {"role": "assistant", "content": ""}]
    last = len(messages) - 1
    text = render(tokenizer, flatten(messages))
    bounds, left_out = block_bounds(tokenizer, messages, text, which={last})
    if last in left_out:
        raise TemplateError(f"the chat template does not render an assistant turn at the end; {TEMPLATE_FIX}")
    return text[: bounds[last][-1]]


def trained_mask(rendered: Rendered, row: dict[str, Any], responses_only: bool) -> list[int]:
    """1 on the tokens plain SFT puts loss on: every token, or (responses only, "messages" rows) each located
    assistant turn's content and end-of-turn markup."""
    if not responses_only or "text" in row:
        return [1] * len(rendered.input_ids)
    spans = [
        (bounds[0], tail[1])
        for message, bounds, tail in zip(row["messages"], rendered.bounds, rendered.tails, strict=True)
        if message["role"] == "assistant" and bounds is not None
    ]
    return [int(owner is not None) for owner in owners(rendered.offsets, spans)]


def sft_examples(tokenizer: Any, row: dict[str, Any], responses_only: bool) -> list[dict[str, list[int]]]:
    """The row's examples (see `examples`) as SFTTrainer takes them: tokens and the mask of those trained."""
    try:
        found = examples(tokenizer, row, responses_only, locate=False)
    except TemplateError as error:
        raise TemplateError(f"{error}, or set train_on_responses_only=False to train on every token") from None
    return [
        {"input_ids": e.rendered.input_ids, "assistant_masks": trained_mask(e.rendered, e.row, responses_only)}
        for e in found
    ]


def map_rows(path: str | Path, tokenize: Callable[[dict[str, Any]], Any]) -> Iterator[Any]:
    """`tokenize` applied to each row of a JSONL file; a TemplateError names the file's line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield tokenize(json.loads(line))
                except TemplateError as error:
                    raise TemplateError(f"{Path(path).name} line {number}: {error}") from None


def examples_dataset(path: str | Path, row_examples: Callable[[dict[str, Any]], list[dict]], trains: Callable):
    """The examples of every row of a JSONL file, less those that train no token (`trains` says which do: a row
    whose every turn trains in an example of its own, one with no assistant turn under responses-only)."""
    from datasets import Dataset

    found = [example for row in map_rows(path, row_examples) for example in row if trains(example)]
    if not found:
        raise ValueError(
            f"{Path(path).name}: no row has a token to train (responses-only training trains assistant turns): "
            "add assistant turns, or set train_on_responses_only=False"
        )
    return Dataset.from_list(found)


def sft_dataset(path: str | Path, tokenizer: Any, responses_only: bool):
    return examples_dataset(
        path, lambda row: sft_examples(tokenizer, row, responses_only), lambda e: 1 in e["assistant_masks"]
    )


def preference_dataset(path: str | Path):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"prompt": flatten(row["prompt"]), "chosen": flatten(row["chosen"]), "rejected": flatten(row["rejected"])}
            for row in read_jsonl(path)
        ]
    )

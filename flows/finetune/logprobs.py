"""Conversations as tokens with their content blocks located, and the logprob a model gives each token.

Shared by the logprob job, the logprob callback during training and weighted SFT (block weights -> token
weights). A message's `content` is a string or a list of blocks ``{"type": "text", "text": ..., "tag": ...,
"weight": ...}``; the conversation is rendered once with the chat template and tokenized once, and each token
belongs to the block its first character falls in — so logprobs and weights always refer to the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flows.finetune.data import TemplateError, assistant_spans, flatten

SENTINEL = "\x00ow-block\x00"


@dataclass
class Block:
    message: int  # index of the message (0 for a "text" row)
    index: int  # index of the block in the message's content
    start: int  # character span in the rendered text
    end: int
    weight: float | None  # the block's explicit weight, if it has one


@dataclass
class Encoded:
    input_ids: list[int]
    starts: list[int]  # first character of each token in the rendered text
    trained: list[int]  # 1 where plain SFT puts loss on the token (assistant turns, or all with responses_only off)
    blocks: list[Block]
    tails: list[tuple[int, int, int]] = field(default_factory=list)  # (message, start, end): end-of-turn markers

    def block_of_token(self) -> list[int | None]:
        """For each token, the index (in `blocks`) of the block holding its first character, or None."""
        owners: list[int | None] = []
        for start in self.starts:
            owners.append(next((i for i, b in enumerate(self.blocks) if b.start <= start < b.end), None))
        return owners


def content_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string is one text block)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else [dict(b) for b in content]


def _content_start(tokenizer: Any, flat: list[dict[str, str]], i: int, text: str) -> int:
    """Where message i's content starts in `text` (rendered with the sentinel in its place, so text equal to
    the template's own markup cannot be mistaken for it)."""
    marked = tokenizer.apply_chat_template(
        [*flat[:i], {**flat[i], "content": SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    position = marked.find(SENTINEL)
    content = flat[i]["content"]
    if position < 0 or not text.startswith(marked[:position]) or text[position : position + len(content)] != content:
        raise TemplateError(
            f"the chat template does not render message {i}'s content verbatim (it strips or rewrites it), so its "
            "blocks cannot be located in the tokens; pass a chat_template that renders content as it is"
        )
    return position


def encode(tokenizer: Any, row: dict[str, Any], responses_only: bool) -> Encoded:
    """Render and tokenize one row ("messages" or "text"), locating its blocks and plain SFT's loss mask."""
    if "text" in row:
        text = row["text"] + (tokenizer.eos_token or "")
        blocks, tails = [Block(0, 0, 0, len(row["text"]), None)], [(0, len(row["text"]), len(text))]
        spans = [(0, len(text))]
    else:
        flat = flatten(row["messages"])
        text, spans = assistant_spans(tokenizer, flat)
        blocks, tails = [], []
        for i, message in enumerate(row["messages"]):
            position = _content_start(tokenizer, flat, i, text)
            for j, block in enumerate(content_blocks(message["content"])):
                weight = block.get("weight", message.get("weight"))  # a message's weight: its blocks' default
                blocks.append(Block(i, j, position, position + len(block["text"]), weight))
                position += len(block["text"])
            message_end = len(tokenizer.apply_chat_template(flat[: i + 1], tokenize=False))
            tails.append((i, position, message_end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    trained = [int(not responses_only or any(s <= start < e for s, e in spans)) for start in starts]
    return Encoded(encoded["input_ids"], starts, trained, blocks, tails)


def token_weights(encoded: Encoded) -> list[float]:
    """Weighted SFT's weight of each token. A token in a block with a `weight` gets that weight; the end-of-turn
    markup after a message's last block gets that block's weight where plain SFT trains it; every other token
    gets plain SFT's mask (1 on the tokens it trains, 0 elsewhere) — so with no weights, or all weights 1, the
    loss is plain SFT's."""
    owners = encoded.block_of_token()
    last_weight = {}
    for block in encoded.blocks:
        last_weight[block.message] = block.weight
    weights = []
    for position, (start, trained, owner) in enumerate(zip(encoded.starts, encoded.trained, owners, strict=True)):
        weight: float = trained
        if owner is not None and encoded.blocks[owner].weight is not None:
            weight = encoded.blocks[owner].weight
        elif owner is None and trained:
            tail = next((m for m, s, e in encoded.tails if s <= start < e), None)
            if tail is not None and last_weight.get(tail) is not None:
                weight = last_weight[tail]
        weights.append(float(weight) if position else 0.0)  # the first token is never predicted
    return weights


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Evaluation mode (no dropout) without gradients, restoring the training mode afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def token_logprobs(model: Any, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[list[float]]:
    """log p(token_t | tokens_<t) for every token of every sequence (0.0 for the first, which has no context)."""
    import torch

    device = next(model.parameters()).device
    results: list[list[float]] = []
    with eval_mode(model):
        for offset in range(0, len(sequences), batch_size):
            batch = sequences[offset : offset + batch_size]
            longest = max(len(s) for s in batch)
            ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, sequence in enumerate(batch):
                ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, sequence in enumerate(batch):
                n = len(sequence)
                logp = torch.log_softmax(logits[row, : n - 1].float(), dim=-1)
                picked = logp.gather(-1, ids[row, 1:n].to(device).unsqueeze(-1)).squeeze(-1)
                results.append([0.0, *picked.cpu().tolist()])
    return results


def with_block_logprobs(row: dict[str, Any], encoded: Encoded, logprobs: list[float]) -> dict[str, Any]:
    """`row` with every message's content as blocks, each block carrying `logprobs` (the sum over its tokens)
    and `num_tokens` (how many); OpenWeights' blockwise format. A block marked ``"logprobs": false`` is left as is."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for position, owner in enumerate(encoded.block_of_token()):
        if owner is not None and position > 0:
            sums[owner] = sums.get(owner, 0.0) + logprobs[position]
            counts[owner] = counts.get(owner, 0) + 1
    out = dict(row)
    if "text" in row:
        out["logprobs"], out["num_tokens"] = sums.get(0, 0.0), counts.get(0, 0)
        return out
    messages = [{**m, "content": content_blocks(m["content"])} for m in row["messages"]]
    for k, block in enumerate(encoded.blocks):
        target = messages[block.message]["content"][block.index]
        if target.get("logprobs", True) is not False:
            target["logprobs"], target["num_tokens"] = sums.get(k, 0.0), counts.get(k, 0)
    out["messages"] = messages
    return out


def is_block_formatted(rows: list[dict[str, Any]]) -> bool:
    return any(not isinstance(m["content"], str) for row in rows for m in row.get("messages", []))


def tagged_blocks(row: dict[str, Any]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(message index, block index, block) of every block with a `tag` in a row from `with_block_logprobs`."""
    for i, message in enumerate(row.get("messages", [])):
        for j, block in enumerate(message["content"]):
            if block.get("tag"):
                yield i, j, block


@dataclass
class Scored:
    rows: list[dict[str, Any]]  # each input row with per-block logprobs (and per-token ones when asked)
    loss: float | None  # mean negative logprob over the tokens plain SFT trains (None when there are none)


def score(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    batch_size: int,
    *,
    responses_only: bool = True,
    with_tokens: bool = False,
    encoded: list[Encoded] | None = None,
) -> Scored:
    """Logprobs of every row under `model`: per block, optionally per token, and the mean loss. `encoded`: the
    rows already encoded (with `responses_only`), for a caller that scores the same rows again and again."""
    if encoded is None:
        encoded = [encode(tokenizer, row, responses_only) for row in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    logprobs = token_logprobs(model, [e.input_ids for e in encoded], batch_size, pad_id)
    total, count, scored = 0.0, 0, []
    for row, enc, logp in zip(rows, encoded, logprobs, strict=True):
        out = with_block_logprobs(row, enc, logp)
        if with_tokens:
            out["tokens"] = [
                {"token": tokenizer.decode([token]), "token_id": token, "logprob": value if i else None}
                for i, (token, value) in enumerate(zip(enc.input_ids, logp, strict=True))
            ]
        trained = [value for i, (value, t) in enumerate(zip(logp, enc.trained, strict=True)) if i and t]
        total, count = total - sum(trained), count + len(trained)
        scored.append(out)
    return Scored(scored, total / count if count else None)

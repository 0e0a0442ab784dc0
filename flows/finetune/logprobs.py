"""Conversations as tokens with their content blocks located, and the logprob a model gives each token.

Shared by the logprob job, the logprob callback during training and weighted SFT (block weights -> token
weights). A message's `content` is a string or a list of blocks ``{"type": "text", "text": ..., "tag": ...,
"weight": ...}`` (a message may carry a `weight` for its blocks); the conversation is rendered once with the chat
template and tokenized once (data.render_row locates the blocks), and each token belongs to the first block it
covers a character of — so logprobs and weights always refer to the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flows.finetune.data import Rendered, content_blocks, owners, render_row, trained_mask


@dataclass
class Block:
    message: int  # index of the message (0 for a "text" row)
    index: int  # index of the block in the message's content
    start: int  # character span in the rendered text
    end: int
    weight: float | None  # the block's explicit weight (or its message's), if it has one


@dataclass
class Encoded:
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # each token's character span in the rendered text
    trained: list[int]  # 1 where plain SFT puts loss on the token (assistant turns, or all with responses_only off)
    blocks: list[Block]
    tails: list[tuple[int, int, int]] = field(default_factory=list)  # (message, start, end): end-of-turn markup

    def block_of_token(self) -> list[int | None]:
        """For each token, the index (in `blocks`) of the first block it covers a character of, or None."""
        return owners(self.offsets, [(b.start, b.end) for b in self.blocks])


def encode(tokenizer: Any, row: dict[str, Any], responses_only: bool, rendered: Rendered | None = None) -> Encoded:
    """Render and tokenize one row ("messages" or "text"), locating its blocks and plain SFT's loss mask; or
    take it `rendered` already (a training example: its blocks are those of the messages it locates). A block
    without a `weight` takes its message's `weight`, if the message has one."""
    rendered = rendered or render_row(tokenizer, row)
    messages = row.get("messages", [{"content": row.get("text", "")}])
    blocks = []
    for i, (message, bounds) in enumerate(zip(messages, rendered.bounds, strict=True)):
        for j, block in enumerate(content_blocks(message["content"]) if bounds is not None else []):
            blocks.append(Block(i, j, bounds[j], bounds[j + 1], block.get("weight", message.get("weight"))))
    tails = [(i, *tail) for i, tail in enumerate(rendered.tails) if tail is not None]
    trained = trained_mask(rendered, row, responses_only)
    return Encoded(rendered.input_ids, rendered.offsets, trained, blocks, tails)


def token_weights(encoded: Encoded) -> list[float]:
    """Weighted SFT's weight of each token. A token in a block with a `weight` gets that weight; the end-of-turn
    markup after a message's last block gets that block's weight where plain SFT trains it; every other token
    gets plain SFT's mask (1 on the tokens it trains, 0 elsewhere) — so with no weights, or all weights 1, the
    loss is plain SFT's."""
    last_weight = {block.message: block.weight for block in encoded.blocks}  # the message's last block's
    tails = [(start, end) for _, start, end in encoded.tails]
    tail_of_token = owners(encoded.offsets, tails)
    weights = []
    for position, (trained, block, tail) in enumerate(
        zip(encoded.trained, encoded.block_of_token(), tail_of_token, strict=True)
    ):
        weight: float = trained
        if block is not None and encoded.blocks[block].weight is not None:
            weight = encoded.blocks[block].weight
        elif block is None and trained and tail is not None:
            message = encoded.tails[tail][0]
            if last_weight.get(message) is not None:
                weight = last_weight[message]
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

"""Token-weighted SFT: block weights become token weights, and the loss is Σ(w·CE) / Σ|w| over tokens.

A weight of 0 takes a block out of the loss (no gradient), a negative weight pushes its likelihood down. With
no weights (or all 1) the tokens and the loss are plain SFT's. Σ|w| is taken over every micro-batch of an
optimizer step, so gradient accumulation gives the same update as one large batch (as TRL does for plain SFT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from flows.finetune.data import examples, examples_dataset
from flows.finetune.logprobs import encode, token_weights

WEIGHTS = "token_weights"


def weighted_examples(tokenizer: Any, row: dict[str, Any], responses_only: bool, max_length: int) -> list[dict]:
    """The row's examples (data.examples: an assistant turn trains, with its blocks' weights, in the example
    where it is trained in its generation context; other messages' weighted blocks in the row itself)."""
    found = []
    for example in examples(tokenizer, row, responses_only):
        encoded = encode(tokenizer, example.row, responses_only, example.rendered)
        weights = token_weights(encoded)[:max_length]
        input_ids = encoded.input_ids[:max_length]
        labels = [token if weight else -100 for token, weight in zip(input_ids, weights, strict=True)]
        found.append({"input_ids": input_ids, "labels": labels, WEIGHTS: weights})
    return found


def weighted_dataset(path: str | Path, tokenizer: Any, responses_only: bool, max_length: int):
    return examples_dataset(
        path, lambda row: weighted_examples(tokenizer, row, responses_only, max_length), lambda e: any(e[WEIGHTS])
    )


class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's padding, plus the token weights padded with 0."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call([{k: v for k, v in e.items() if k != WEIGHTS} for e in examples])
        weights = torch.zeros(output["input_ids"].shape, dtype=torch.float32)
        for row, example in enumerate(examples):
            weights[row, : len(example[WEIGHTS])] = torch.tensor(example[WEIGHTS], dtype=torch.float32)
        output[WEIGHTS] = weights
        return output


def weighted_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor, total_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ(w·CE) / Σ|w| over the predicted tokens (token t is predicted from the ones before it); `total_weight`
    is Σ|w| of the whole optimizer step (all its micro-batches), by default this batch's."""
    target_weights = weights[:, 1:].to(logits.device)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view_as(target_weights)
    if total_weight is None:
        total_weight = target_weights.abs().sum()
    return (target_weights * ce).sum() / total_weight.to(logits.device).clamp_min(1e-8)


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss weighs each token by its block's weight (see the module docstring)."""

    loss_is_scaled_for_ga = True  # divided by the step's Σ|w| already: the Trainer must not divide again

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the model computes no loss here; compute_loss does

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHTS not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHTS]

    def _get_num_items_in_batch(self, batch_samples: list, device: Any) -> torch.Tensor | None:
        """Σ|w| over the predicted tokens of every micro-batch of the step (the Trainer's token count's place)."""
        if not batch_samples or WEIGHTS not in batch_samples[0]:
            return None
        return sum(batch[WEIGHTS][:, 1:].abs().sum() for batch in batch_samples).to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHTS)
        inputs.pop("labels", None)
        outputs = model(**inputs, use_cache=False)
        loss = weighted_loss(outputs.logits, inputs["input_ids"], weights, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

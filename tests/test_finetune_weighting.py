"""Token-weighted SFT and block logprobs on the tiny model: weights -> tokens, the loss against plain SFT's, no
gradient through weight-0 blocks, and the callbacks' schedule."""

import pytest
import torch

from flows.finetune import backends, callbacks, data, logprobs, train, weighting
from ow_prefect.jobs.finetune import FineTuningParams, WeightedSFTParams
from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

CONV = "conversations:file-0123456789ab"


@pytest.fixture(autouse=True)
def transformers_backend(monkeypatch):
    monkeypatch.setenv("OW_TRAIN_BACKEND", "transformers")


def split_answer(row, head_weight=None, tail_weight=None):
    """The assistant's answer as two blocks: "<A> plus <B>" and " equals <C>."."""
    *prompt, answer = row["messages"]
    head, tail = answer["content"].split(" equals ")
    blocks = [{"type": "text", "text": head, "tag": "head"}, {"type": "text", "text": " equals " + tail, "tag": "tail"}]
    for block, weight in zip(blocks, (head_weight, tail_weight), strict=True):
        if weight is not None:
            block["weight"] = weight
    return {"messages": [*prompt, {"role": "assistant", "content": blocks}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), "default")


def test_block_weights_become_token_weights(tokenizer):
    row = split_answer(sample_conversations(1)[0], head_weight=0, tail_weight=-2)
    encoded = logprobs.encode(tokenizer, row, responses_only=True)
    weights = logprobs.token_weights(encoded)
    pairs = list(zip(encoded.input_ids, weights, strict=True))
    text = {w: "".join(tokenizer.decode([t]) for t, x in pairs if x == w) for w in weights}
    assert text[-2.0].startswith(" equals ") and text[-2.0].endswith("<|im_end|>")  # end of turn: the last block's
    assert text[0.0].startswith("<|im_start|>system") and "plus" in text[0.0]  # the prompt and the 0-weight head
    plain = logprobs.token_weights(logprobs.encode(tokenizer, split_answer(sample_conversations(1)[0]), True))
    assert plain == [float(t) if i else 0.0 for i, t in enumerate(encoded.trained)]  # no weights: SFT's own mask


def test_content_a_template_trims_is_located(tiny_model):
    from transformers import AutoTokenizer

    stripping = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), stripping)
    blocks = [{"type": "text", "text": " padded"}, {"type": "text", "text": " ."}]
    row = {"messages": [{"role": "user", "content": blocks}]}
    encoded = logprobs.encode(tokenizer, row, False)
    assert [(b.start, b.end) for b in encoded.blocks] == [(6, 12), (12, 14)]  # "user: padded .": the space trimmed


def first_batch(trainer, n=4):
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer.data_collator(rows)


def test_all_weights_one_is_plain_sft(tiny_model, tmp_path):
    rows = sample_conversations(8)
    plain_path = write_jsonl(rows, tmp_path / "plain.jsonl")
    weighted_path = write_jsonl([split_answer(r, 1, 1) for r in rows], tmp_path / "weighted.jsonl")
    sft = FineTuningParams(model=str(tiny_model), training_file=CONV, max_seq_length=64)
    wsft = WeightedSFTParams(model=str(tiny_model), training_file=CONV, max_seq_length=64)
    loaded = backends.load(sft)
    plain = train.build_trainer(sft, loaded, plain_path, None, tmp_path / "a", [])
    weighted = train.build_trainer(wsft, loaded, weighted_path, None, tmp_path / "b", [])
    plain_batch, weighted_batch = first_batch(plain), first_batch(weighted)
    assert torch.equal(plain_batch["input_ids"], weighted_batch["input_ids"])
    assert torch.equal(plain_batch["labels"], weighted_batch["labels"])  # same tokens, same masking (and cut)
    loaded.model.eval()
    with torch.no_grad():
        plain_loss = plain.compute_loss(loaded.model, dict(plain_batch))
        weighted_loss = weighted.compute_loss(loaded.model, dict(weighted_batch))
    assert weighted_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)


def test_gradient_accumulation_normalises_by_the_whole_step_s_weights(tiny_model, tmp_path):
    """Two micro-batches of different total weight give the loss (and so the update) of one batch of both:
    Σ(w·CE) / Σ|w| over the optimizer step, not an average of per-micro-batch ratios."""
    rows = [split_answer(r, 1, w) for r, w in zip(sample_conversations(6), (1, -0.5, 2, 0, 3, 1), strict=True)]
    path = write_jsonl(rows, tmp_path / "weighted.jsonl")
    cfg = WeightedSFTParams(model=str(tiny_model), training_file=CONV, max_seq_length=64)
    loaded = backends.load(cfg)
    trainer = train.build_trainer(cfg, loaded, path, None, tmp_path / "out", [])
    assert trainer.loss_is_scaled_for_ga, "the Trainer must not divide by the accumulation steps again"
    small, large = (trainer.data_collator([trainer.train_dataset[i] for i in ids]) for ids in ([0], [1, 2, 3, 4, 5]))
    step_weight = trainer._get_num_items_in_batch([small, large], "cpu")
    loaded.model.eval()
    with torch.no_grad():
        accumulated = sum(
            trainer.compute_loss(loaded.model, dict(batch), num_items_in_batch=step_weight) for batch in (small, large)
        )
        whole = trainer.compute_loss(loaded.model, dict(first_batch(trainer, 6)))
        averaged = sum(trainer.compute_loss(loaded.model, dict(batch)) for batch in (small, large)) / 2
    assert accumulated.item() == pytest.approx(whole.item(), rel=1e-5)
    assert averaged.item() != pytest.approx(whole.item(), rel=1e-3)  # what per-micro-batch normalising would give


def test_weight_zero_block_gets_no_gradient_and_negative_weights_flip_it(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    row = split_answer(sample_conversations(1)[0], head_weight=0, tail_weight=1)
    [encoded] = weighting.weighted_examples(tokenizer, row, True, 512)
    ids = torch.tensor([encoded["input_ids"]])
    weights = torch.tensor([encoded[weighting.WEIGHTS]])
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    logits = model(input_ids=ids).logits.detach().requires_grad_()
    weighting.weighted_loss(logits, ids, weights).backward()
    # logits[t] predicts token t+1: the rows predicting a weight-0 token have no gradient at all
    grad_norm = logits.grad[0, :-1].norm(dim=-1)
    zero = weights[0, 1:] == 0
    assert torch.all(grad_norm[zero] == 0) and torch.all(grad_norm[~zero] > 0)
    flipped = torch.where(weights > 0, -weights, weights)
    logits.grad = None
    weighting.weighted_loss(logits, ids, flipped).backward()
    negative_grad = logits.grad.clone()
    logits.grad = None
    weighting.weighted_loss(logits, ids, weights).backward()
    assert torch.allclose(negative_grad, -logits.grad)  # same size, opposite direction: likelihood pushed down


@pytest.mark.parametrize(
    ("every", "steps"),
    [(3, [0, 3, 6, 9, 10]), ("log", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])],
)
def test_callbacks_run_at_step_zero_every_n_and_the_last(every, steps):
    assert [s for s in range(11) if callbacks.due(s, every, max_steps=10)] == steps
    assert [s for s in range(10, 301) if callbacks.due(s, "log", max_steps=1000)] == [
        *range(10, 100, 10),
        *range(100, 301, 100),
    ]

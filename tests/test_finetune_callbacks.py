"""The sampling callback on the tiny model, without training: what it samples and when, and how its results
read back — upstream OpenWeights' tests/test_sampling_callback.py restated: its cookbook helper
(cookbook/sft/sampling_callback.py) reads the samples file that a `samples` record names and counts the
completions that start with a prefix."""

import copy
import json
from pathlib import Path

import pytest
from transformers import TrainerState

from flows.finetune import callbacks, data
from ow_prefect.jobs.finetune import SamplingCallback
from ow_prefect.testing.tiny_model import sample_conversations


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), "default")
    return AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer


def fraction_with_prefix(path, prefix: str) -> float:
    """The cookbook's helper as upstream's test wants it: the file it is given, its trailing newline ignored."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]
    return sum(row["completion"].startswith(prefix) for row in rows) / len(rows)


def test_a_trailing_assistant_message_is_the_prefix_the_completion_continues(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    question = sample_conversations(1)[0]["messages"][:2]
    prompt = callbacks.prompt_text(tokenizer, {"messages": [*question, {"role": "assistant", "content": "Two"}]})
    assert prompt == tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True) + "Two"


def test_sampler_results_read_back_the_cookbook_way(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    prompts = [{"messages": r["messages"][:2]} for r in sample_conversations(3, seed=6)]
    prompts[0]["messages"].append({"role": "assistant", "content": "Seven"})
    spec = SamplingCallback(dataset="conversations:file-0123456789ab", eval_steps=4, tag="arith", max_tokens=5)
    sink = callbacks.LocalSink(tmp_path)
    sampler = callbacks.Sampler(prompts, tokenizer, sink, spec)
    state = TrainerState(max_steps=10)
    sampler.on_train_begin(None, state, None, model=model)
    for step in range(1, 11):
        state.global_step = step
        sampler.on_step_end(None, state, None, model=model)

    # step 0, every 4 steps, and the last step (upstream samples at 0 and every eval_steps, not at the end)
    assert [(r["type"], r["tag"], r["step"]) for r in sink.records] == [("samples", "arith", s) for s in (0, 4, 8, 10)]
    assert len({r["file"] for r in sink.records}) == 4  # each record names its own file
    greedy = callbacks.generate(model, tokenizer, prompts, batch_size=8, temperature=0.0, max_tokens=5)
    for record in sink.records:
        assert Path(record["file"]).read_text(encoding="utf-8").endswith("}\n")
        rows = data.read_jsonl(record["file"])
        assert [r["messages"] for r in rows] == [p["messages"] for p in prompts]  # the prompts, prefix included
        assert [r["completion"] for r in rows] == greedy  # what follows the prefix, not the prefix again
        assert fraction_with_prefix(record["file"], "") == 1.0
        first = rows[0]["completion"]
        expected = sum(r["completion"].startswith(first) for r in rows) / len(rows)
        assert fraction_with_prefix(record["file"], first) == expected and expected >= 1 / 3


QWEN3_PROMPT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def test_the_sample_prompt_is_what_training_puts_before_an_answer_with_the_real_qwen3_template(tiny_model):
    """Qwen3 trains an answer after the empty think scaffold (non-thinking mode): samples are generated after
    it too, not after the bare `<|im_start|>assistant\\n` of the template's generation prompt (thinking mode)."""
    from tests.test_finetune_templates import family_tokenizer

    tokenizer = family_tokenizer(tiny_model, "qwen3")
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    assert callbacks.prompt_text(tokenizer, {"messages": question}) == QWEN3_PROMPT
    [out] = data.sft_examples(tokenizer, {"messages": [*question, {"role": "assistant", "content": "Four."}]}, True)
    assert tokenizer.decode(out["input_ids"][: out["assistant_masks"].index(1)]) == QWEN3_PROMPT
    prefixed = {"messages": [*question, {"role": "assistant", "content": "Two"}]}
    assert callbacks.prompt_text(tokenizer, prefixed) == QWEN3_PROMPT + "Two"
    later = [*question, {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3 + 3?"}]
    assert callbacks.prompt_text(tokenizer, {"messages": later}) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )  # an earlier turn as the template renders it once others follow; the new one after the scaffold


def test_the_sampler_generates_after_that_prompt(model_and_tokenizer, tmp_path, monkeypatch):
    """The Sampler hands the model exactly that text with Qwen3's template (the model's own generate, watched)."""
    from tests.test_finetune_templates import trl_template

    model, tokenizer = model_and_tokenizer
    tokenizer = data.prepare_tokenizer(copy.deepcopy(tokenizer), trl_template("qwen3"))
    given = []

    def watched(input_ids, **options):
        given.append(tokenizer.decode(input_ids[0]))
        return real(input_ids=input_ids, **options)

    real = model.generate
    monkeypatch.setattr(model, "generate", watched)
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    spec = SamplingCallback(dataset="conversations:file-0123456789ab", eval_steps=4, tag="qwen3", max_tokens=3)
    sink = callbacks.LocalSink(tmp_path)
    callbacks.Sampler([{"messages": question}], tokenizer, sink, spec).measure(model, 0)
    assert given == [QWEN3_PROMPT] and len(data.read_jsonl(sink.records[0]["file"])) == 1

"""Responses-only masks, block spans and weighted-SFT token weights under the real chat templates of the model
families people fine-tune — Qwen3 (with and without reasoning), Qwen2.5, Llama 3.x, Gemma 3, OLMo 2/3, Mistral —
put on the tiny tokenizer with each family's special tokens; each test decodes what is trained and compares it
with what should be, turn by turn. Also upstream OpenWeights' own expectations of these spans (its
tests/test_chat_template_spans.py), restated for our functions. Tokenizer-only: no model runs.

The templates come from installed packages, not from this project: TRL keeps byte-identical copies of the
official ones (trl/chat_templates, checked against the Hub by its CI); unsloth's copies (unsloth/chat_templates.py,
read as text: importing unsloth patches transformers) give Mistral and Qwen3's thinking template; OLMo's, which
no package ships, are kept as published under tests/data/chat_templates.
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import trl

from flows.finetune import data, logprobs

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
OUR_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def trl_template(name: str) -> str:
    return (TRL_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def unsloth_template(variable: str) -> str:
    spec = importlib.util.find_spec("unsloth")
    if spec is None:
        pytest.skip("unsloth is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "chat_templates.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == variable for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(variable)


def shipped_template(name: str) -> str:
    return (OUR_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


QWEN = {"eos": "<|im_end|>", "added": ["<think>", "</think>"]}
LLAMA = {
    "bos": "<|begin_of_text|>",
    "eos": "<|eot_id|>",
    "specials": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
# family -> (where its template comes from, its special tokens, the end-of-turn markup of an earlier and of the
# last assistant turn: what the model must emit to stop, without the newline some templates put after it)
FAMILIES = {
    "qwen3": (lambda: trl_template("qwen3"), QWEN, "<|im_end|>", "<|im_end|>"),
    "qwen3-unsloth": (lambda: unsloth_template("qwen3_template"), QWEN, "<|im_end|>", "<|im_end|>"),
    "qwen3-thinking-2507": (lambda: unsloth_template("qwen3_thinking_template"), QWEN, "<|im_end|>", "<|im_end|>"),
    "qwen3-instruct-2507": (lambda: trl_template("qwen3_instruct_2507"), QWEN, "<|im_end|>", "<|im_end|>"),
    "qwen2.5": (lambda: trl_template("qwen2_5"), QWEN, "<|im_end|>", "<|im_end|>"),
    "llama3": (lambda: trl_template("llama3"), LLAMA, "<|eot_id|>", "<|eot_id|>"),
    "llama3.1": (lambda: trl_template("llama3_1"), LLAMA, "<|eot_id|>", "<|eot_id|>"),
    "llama3.2": (lambda: trl_template("llama3_2"), LLAMA, "<|eot_id|>", "<|eot_id|>"),
    "gemma3": (
        lambda: trl_template("gemma3"),
        {"bos": "<bos>", "eos": "<eos>", "specials": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]},
        "<end_of_turn>",
        "<end_of_turn>",
    ),
    "mistral": (
        lambda: unsloth_template("mistral_template"),
        {"bos": "<s>", "eos": "</s>", "specials": ["<s>", "</s>", "[INST]", "[/INST]"]},
        "</s>",
        "</s>",
    ),
    "olmo2": (
        lambda: shipped_template("olmo2"),
        {"bos": "<|endoftext|>", "eos": "<|endoftext|>"},
        "<|endoftext|>",
        "<|endoftext|>",
    ),
    "olmo3": (lambda: shipped_template("olmo3"), {"eos": "<|endoftext|>"}, "<|im_end|>", "<|endoftext|>"),
}


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tiny_model):
    return tiny_model


def family_tokenizer(tiny_model, family: str):
    """The tiny tokenizer wearing `family`'s chat template, special tokens, bos and eos."""
    from transformers import AutoTokenizer

    load, tokens, *_ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens(tokens.get("specials", []), special_tokens=True)
    tokenizer.add_tokens(tokens.get("added", []))
    for role in ("bos", "eos"):
        if role in tokens:
            setattr(tokenizer, f"{role}_token", tokens[role])
    return data.prepare_tokenizer(tokenizer, load())


def runs(tokenizer, ids: list[int], selected: list) -> list[str]:
    """The decoded runs of consecutive selected tokens: what is trained, piece by piece."""
    pieces, current = [], []
    for token, chosen in zip(ids, selected, strict=True):
        if chosen:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces + ([tokenizer.decode(current)] if current else [])


def trained(tokenizer, row, responses_only=True) -> list[str]:
    """What SFT trains of a row, piece by piece, over all the examples it trains as."""
    found = data.sft_examples(tokenizer, row, responses_only)
    return [piece for out in found for piece in runs(tokenizer, out["input_ids"], out["assistant_masks"])]


def in_context(tokenizer, out) -> list[tuple[str, str]]:
    """(the text before it, the piece) for each trained piece of one example."""
    ids, mask = out["input_ids"], out["assistant_masks"]
    starts = [k for k in range(len(ids)) if mask[k] and not (k and mask[k - 1])]
    pieces = runs(tokenizer, ids, mask)
    return [(tokenizer.decode(ids[:k]), piece) for k, piece in zip(starts, pieces, strict=True)]


def generation_prompt(tokenizer, messages) -> str:
    """What the model is given to generate the turn after `messages`: the template's generation prompt, in
    non-thinking mode where the template has one (`enable_thinking=False`; other templates ignore it)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def weighted(tokenizer, row) -> dict[float, list[str]]:
    """weight -> the decoded runs of tokens with that weight, over all the examples weighted SFT trains on."""
    from flows.finetune import weighting

    found: dict[float, list[str]] = {}
    for example in weighting.weighted_examples(tokenizer, row, True, 4096):
        ids, weights = example["input_ids"], example[weighting.WEIGHTS]
        for w in dict.fromkeys(weights):
            found.setdefault(w, []).extend(runs(tokenizer, ids, [x == w for x in weights]))
    return found


def blocks_text(tokenizer, row) -> list[str]:
    encoded = logprobs.encode(tokenizer, row, responses_only=True)
    owners = encoded.block_of_token()
    return [
        tokenizer.decode([t for t, owner in zip(encoded.input_ids, owners, strict=True) if owner == k])
        for k in range(len(encoded.blocks))
    ]


def conversation(*turns: str, system: str | None = "Be brief.") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return {"messages": messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


SINGLE = conversation("What is two plus two?", "Two plus two is four.")
MULTI = conversation("Hi there.", "Hello.", "What is the capital of France?", "Paris.")


@pytest.mark.parametrize("family", FAMILIES)
def test_responses_only_trains_each_answer_and_its_end_of_turn(tiny_model, family):
    tokenizer = family_tokenizer(tiny_model, family)
    *_, earlier_end, last_end = FAMILIES[family]
    assert trained(tokenizer, SINGLE) == ["Two plus two is four." + last_end]
    assert trained(tokenizer, MULTI) == ["Hello." + earlier_end, "Paris." + last_end]
    without_system = conversation("Hi there.", "Hello.", system=None)
    assert trained(tokenizer, without_system) == ["Hello." + last_end]  # a default system prompt is not trained


@pytest.mark.parametrize("family", FAMILIES)
def test_train_on_responses_only_false_trains_every_token(tiny_model, family):
    tokenizer = family_tokenizer(tiny_model, family)
    [out] = data.sft_examples(tokenizer, MULTI, responses_only=False)  # the row as it renders, one example
    assert all(out["assistant_masks"])
    assert tokenizer.decode(out["input_ids"]) == tokenizer.apply_chat_template(flat(MULTI), tokenize=False)


def flat(row):
    return data.flatten(row["messages"])


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_located_exactly(tiny_model, family):
    """Each block's tokens decode to the block, whatever the template adds around it (default system prompts,
    a system prompt merged into the first user turn, headers). A token that straddles two blocks belongs to
    the first, so these blocks part where the tokens do."""
    tokenizer = family_tokenizer(tiny_model, family)
    row = conversation(
        "Hi there.",
        [{"type": "text", "text": "Hello,"}, {"type": "text", "text": " how can I help?"}],
        "What is the capital of France?",
        [{"type": "text", "text": "It is"}, {"type": "text", "text": " Paris."}],
    )
    expected = [b["text"] for m in row["messages"] for b in data.content_blocks(m["content"])]
    assert blocks_text(tokenizer, row) == expected


# Qwen3: the empty think scaffold, reasoning, and a template that re-renders earlier turns


def test_qwen3_single_turn_trains_exactly_the_answer_and_im_end(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    text = tokenizer.apply_chat_template(flat(SINGLE), tokenize=False)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nTwo plus two is four.<|im_end|>\n" in text
    assert trained(tokenizer, SINGLE) == ["Two plus two is four.<|im_end|>"]


def test_qwen3_multi_turn_trains_every_turn_and_never_the_scaffold(tiny_model):
    """Qwen3 renders the scaffold on the last turn only, so the conversation is not prefix-stable: rendered up to
    turn 1, turn 1 has a scaffold it does not have in the whole row."""
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    prefix = tokenizer.apply_chat_template(flat(MULTI)[:3], tokenize=False)
    assert not tokenizer.apply_chat_template(flat(MULTI), tokenize=False).startswith(prefix)
    assert trained(tokenizer, MULTI) == ["Hello.<|im_end|>", "Paris.<|im_end|>"]


RE_RENDERING = {"qwen3", "qwen3-unsloth", "qwen3-thinking-2507"}  # an earlier turn renders as it is not generated
THREE_TURNS = conversation("Hi there.", "Hello.", "What is the capital of France?", "Paris.", "And of Italy?", "Rome.")


@pytest.mark.parametrize("row", [MULTI, THREE_TURNS], ids=["2 turns", "3 turns"])
def test_qwen3_trains_each_turn_once_after_exactly_what_the_model_is_given_to_generate_it(tiny_model, row):
    """An earlier Qwen3 turn renders in the row without the empty think scaffold that precedes it when it is
    generated, so the row does not train it: the conversation cut after it is an example of its own, which
    trains that turn alone. Every trained turn follows exactly the generation prompt of the conversation before
    it in non-thinking mode, and is exactly its answer and <|im_end|>; each is trained once."""
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    messages = flat(row)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    found = data.sft_examples(tokenizer, row, responses_only=True)
    assert len(found) == len(turns)  # one per earlier turn, then the row, which trains the last turn
    for out, turn in zip(found, turns, strict=True):
        before = generation_prompt(tokenizer, messages[:turn])
        assert before.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert in_context(tokenizer, out) == [(before, messages[turn]["content"] + "<|im_end|>")]
        whole = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        assert tokenizer.decode(out["input_ids"]) == whole  # the conversation cut after the turn, as it renders
    assert sorted(trained(tokenizer, row)) == sorted(messages[turn]["content"] + "<|im_end|>" for turn in turns)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_turn_trains_after_the_generation_prompt_in_one_example_where_the_template_is_prefix_stable(
    tiny_model, family
):
    """The prefix-stable families train a row as one example, every turn in it; in every family each trained
    turn follows exactly what the model is given to generate it. (Qwen3-Thinking-2507's generation prompt opens
    `<think>\\n` and the model writes the rest of an empty reasoning itself; the scaffold does not train.)"""
    tokenizer = family_tokenizer(tiny_model, family)
    *_, earlier_end, last_end = FAMILIES[family]
    messages = flat(THREE_TURNS)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    found = data.sft_examples(tokenizer, THREE_TURNS, responses_only=True)
    assert len(found) == (len(turns) if family in RE_RENDERING else 1)
    contexts = [pair for out in found for pair in in_context(tokenizer, out)]
    expected = []
    for turn in turns:
        before = generation_prompt(tokenizer, messages[:turn])
        if family == "qwen3-thinking-2507":
            before += "\n</think>\n\n"
        end = last_end if turn == turns[-1] or len(found) > 1 else earlier_end
        expected.append((before, messages[turn]["content"] + end))
    assert sorted(contexts) == sorted(expected)


def test_qwen3_reasoning_of_every_turn_is_trained_in_the_context_it_is_generated_in(tiny_model):
    """Qwen3 keeps only the last turn's reasoning: the row drops an earlier turn's, and the conversation cut
    after that turn keeps it — where it is trained, as the model writes it. The `<think>\\n` the template writes
    itself before a last turn is not trained (as upstream)."""
    row = conversation(
        "Hi there.",
        "<think>\nA greeting.\n</think>\n\nHello.",
        "What is the capital of France?",
        "<think>\nIt is Paris.\n</think>\n\nParis.",
    )
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    messages = flat(row)
    found = [in_context(tokenizer, out) for out in data.sft_examples(tokenizer, row, responses_only=True)]
    thinking = [  # the generation prompt in thinking mode: the model opens `<think>` itself
        tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True) for turn in (2, 4)
    ]
    assert found == [
        [(thinking[0] + "<think>\n", "A greeting.\n</think>\n\nHello.<|im_end|>")],
        [(thinking[1] + "<think>\n", "It is Paris.\n</think>\n\nParis.<|im_end|>")],
    ]
    assert "<|im_start|>assistant\nHello.<|im_end|>\n" in thinking[1]  # an earlier turn's reasoning dropped
    keeps_reasoning = family_tokenizer(tiny_model, "qwen2.5")  # renders content as it is
    assert trained(keeps_reasoning, row) == [m["content"] + "<|im_end|>" for m in row["messages"][2::2]]


def test_a_turn_whose_content_the_row_renders_otherwise_trains_in_its_own_example(tiny_model):
    """The text before a turn can be the same in the row and when it is generated while the turn itself is
    not (here earlier turns lose their reasoning, the last keeps it): that turn, too, trains as it is written,
    in the conversation cut after it."""
    from transformers import AutoTokenizer

    drops_earlier_reasoning = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), drops_earlier_reasoning)
    row = conversation("Hi.", "<think>A greeting.</think>Hello.", "Bye.", "Goodbye.", "Thanks.", "You are welcome.")
    messages = flat(row)
    found = [in_context(tokenizer, out) for out in data.sft_examples(tokenizer, row, responses_only=True)]
    assert (
        found
        == [
            [(generation_prompt(tokenizer, messages[:2]), "<think>A greeting.</think>Hello.<|im_end|>")],
            [
                (generation_prompt(tokenizer, messages[:4]), "Goodbye.<|im_end|>"),  # no reasoning to drop: as it is
                (generation_prompt(tokenizer, messages[:6]), "You are welcome.<|im_end|>"),
            ],
        ]
    )


# Upstream's tests/test_chat_template_spans.py, restated: its fake Qwen3 tokenizer there is the real template here.


def test_upstream_intent_response_only_never_trains_the_think_scaffold(tiny_model):
    """Upstream trains the final Qwen3 turn without `<think>`; so do we. (Upstream also leaves the earlier
    turns of a Qwen3 row untrained, because their context differs from the one they are generated in; we
    train each in that context, in an example of its own — a deliberate difference, see
    docs/coming-from-openweights.md.)"""
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    pieces = trained(tokenizer, MULTI)
    assert pieces[-1] == "Paris.<|im_end|>" and not any("<think>" in p or "</think>" in p for p in pieces)


def test_upstream_intent_prefix_stable_template_trains_all_assistant_turns(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "qwen2.5")
    assert trained(tokenizer, MULTI) == ["Hello.<|im_end|>", "Paris.<|im_end|>"]


@pytest.mark.parametrize(
    "turns", [3, 2], ids=["non-final turn: does not absorb the next user", "final turn: excludes the think scaffold"]
)
def test_upstream_intent_weighted_assistant_block_is_exactly_its_text(tiny_model, turns):
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    texts = [("user", "user 1", 0), ("assistant", "assistant 1", 1), ("user", "user 2", 0)][:turns]
    row = {"messages": [{"role": r, "content": [{"type": "text", "text": t, "weight": w}]} for r, t, w in texts]}
    assert blocks_text(tokenizer, row) == [text for _, text, _ in texts]
    assert weighted(tokenizer, row)[1.0] == ["assistant 1<|im_end|>"]


def test_message_weight_applies_to_its_blocks(tiny_model):
    """A message's `weight` is the weight of its blocks that have none (and of its end-of-turn markup); a
    block's own weight wins. On a user message it puts that message into the loss."""
    tokenizer = family_tokenizer(tiny_model, "qwen3")
    row = {
        "messages": [
            {"role": "user", "content": "Hi there.", "weight": 0.5},
            {
                "role": "assistant",
                "weight": -1,
                "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": " friend.", "weight": 2}],
            },
        ]
    }
    by_weight = weighted(tokenizer, row)
    assert by_weight[0.5] == ["Hi there."] and by_weight[-1.0] == ["Hello,"]
    assert by_weight[2.0] == [" friend.<|im_end|>"]  # the end of turn takes the last block's weight


def test_weighted_sft_weighs_each_turn_in_the_example_where_it_trains(tiny_model):
    """Weighted SFT trains the same examples: an earlier Qwen3 turn's blocks carry their weights in the
    conversation cut after it (after exactly its generation prompt), not in the row; the last turn's and the
    other messages' weighted blocks in the row. No weighted block is counted twice."""
    from flows.finetune import weighting

    tokenizer = family_tokenizer(tiny_model, "qwen3")
    row = {
        "messages": [
            {"role": "user", "content": "Hi there.", "weight": 0.5},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Hello,", "weight": 2}, {"type": "text", "text": " friend."}],
            },
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris.", "weight": -1},
        ]
    }
    messages = flat(row)
    cut, whole = weighting.weighted_examples(tokenizer, row, True, 4096)
    assert tokenizer.decode(cut["input_ids"]) == tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert tokenizer.decode(whole["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)

    def by_weight(example):
        ids, weights = example["input_ids"], example[weighting.WEIGHTS]
        first = next(k for k, w in enumerate(weights) if w)
        pieces = {w: runs(tokenizer, ids, [x == w for x in weights]) for w in dict.fromkeys(weights) if w}
        return tokenizer.decode(ids[:first]), pieces

    assert by_weight(cut) == (
        generation_prompt(tokenizer, messages[:1]),
        {2.0: ["Hello,"], 1.0: [" friend.<|im_end|>"]},
    )
    _, pieces = by_weight(whole)
    assert pieces == {0.5: ["Hi there."], -1.0: ["Paris.<|im_end|>"]}  # the user message's weight applies here


def test_a_message_the_template_leaves_out_has_no_tokens(tiny_model):
    from transformers import AutoTokenizer

    no_system = (
        "{% for m in messages %}{% if m['role'] != 'system' %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), no_system)
    assert trained(tokenizer, MULTI) == ["Hello.<|im_end|>", "Paris.<|im_end|>"]
    assert blocks_text(tokenizer, MULTI) == ["", "Hi there.", "Hello.", "What is the capital of France?", "Paris."]


# What is still refused, and the fixes the error suggests


REVERSED = "{% for m in messages | reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_a_template_whose_turns_cannot_be_located_is_refused_with_fixes_that_work(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), REVERSED)
    (tmp_path / "train.jsonl").write_text(data.jsonl_bytes([SINGLE, SINGLE]).decode())
    with pytest.raises(data.TemplateError) as error:
        data.sft_dataset(tmp_path / "train.jsonl", tokenizer, responses_only=True)
    message = str(error.value)
    assert message.startswith("train.jsonl line 1: ") and "message 1 (user)" in message
    assert "train_on_responses_only=False" in message and "chat_template=" in message
    assert len(data.sft_dataset(tmp_path / "train.jsonl", tokenizer, responses_only=False)) == 2
    with pytest.raises(data.TemplateError, match="chat_template="):
        logprobs.encode(tokenizer, SINGLE, responses_only=True)
    fixed = data.prepare_tokenizer(tokenizer, data.CHATML_TEMPLATE)
    assert trained(fixed, SINGLE) == ["Two plus two is four.<|im_end|>"]

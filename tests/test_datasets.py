"""Dataset validation: every malformed case gets a message naming its line, field and the fix."""

import json
import warnings

import pytest

from ow_prefect.datasets import IgnoredKeysWarning, validate_dataset
from ow_prefect.errors import DatasetValidationError

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def jl(*rows) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


GOOD_CONVERSATIONS = [
    jl({"messages": [U, A]}),
    jl({"messages": [{"role": "system", "content": "be brief"}, U, A]}, {"text": "plain text"}),
    jl(
        {
            "messages": [
                U,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "a", "weight": 0},
                        {"type": "text", "text": "b", "weight": -1.5, "tag": "x"},
                    ],
                },
            ]
        }
    ),
    jl({"messages": [U, A], "meta": {"source": "extra keys on a row are kept"}}) + b"\n\n\n",
]


@pytest.mark.parametrize("data", GOOD_CONVERSATIONS)
def test_valid_conversations(data):
    assert validate_dataset(data, "conversations") >= 1


def test_unknown_keys_are_ignored_with_one_warning_per_file():
    """OpenWeights ignores keys it does not read (its block format documents extra keys as ignored): so do we,
    but one warning names them, so a typo such as `wieght` is seen."""
    block = {"type": "text", "text": "a", "wieght": 1, "source": "x"}
    rows = [{"messages": [U, {"role": "assistant", "content": [block], "thinking": "..."}]}] * 3
    with pytest.warns(IgnoredKeysWarning) as caught:
        assert validate_dataset(jl(*rows), "conversations", source="train.jsonl") == 3
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "train.jsonl" in message and "'wieght' on blocks (3 line(s), first line 1)" in message
    assert "'thinking' on messages" in message and "'source' on blocks" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_dataset(jl({"messages": [U, A]}), "conversations")  # nothing unknown: no warning


def test_message_weight_and_blocks_without_a_type_are_openweights_format():
    rows = [
        {"messages": [{**U, "weight": 0}, {**A, "weight": -0.5}]},
        {"messages": [U, {"role": "assistant", "content": [{"text": "no type, as OpenWeights reads it"}]}]},
    ]
    assert validate_dataset(jl(*rows), "conversations") == 2


def test_preferences_is_openweights_name_for_preference():
    row = {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "no"}]}
    assert validate_dataset(jl(row), "preferences") == 1
    with pytest.raises(DatasetValidationError, match="'preference' file"):
        validate_dataset(jl({"messages": [U, A]}), "preferences")


def test_valid_preference():
    row = {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "no"}]}
    assert validate_dataset(jl(row, row), "preference") == 2


# (purpose, file bytes, text that must appear in the single error)
MALFORMED = [
    ("conversations", b"", "file: empty"),
    ("conversations", b"\n\n", "file: empty"),
    ("conversations", b'{"messages": [', "line 1: invalid JSON"),
    ("conversations", jl(U) + b"not json\n", "line 2: invalid JSON"),
    ("conversations", b"\xff\xfe{}\n", "line 1: invalid UTF-8"),
    ("conversations", jl([U, A]), "line 1: expected a JSON object, got list"),
    ("conversations", jl("text"), "expected a JSON object, got str"),
    ("conversations", jl({"messages": [U, A]}) + b"\n" + jl({"messages": [U, A]}), "line 2: blank line"),
    ("conversations", jl({}), "line 1: row: expected a 'messages' list or a 'text' string"),
    ("conversations", jl({"messages": [U, A], "text": "x"}), "has both 'messages' and 'text'"),
    ("conversations", jl({"messages": []}), "messages: expected a non-empty list"),
    ("conversations", jl({"messages": "hi"}), "messages: expected a non-empty list"),
    ("conversations", jl({"messages": [U, "hello"]}), "messages[1]: expected a message object"),
    ("conversations", jl({"messages": [{"role": "bot", "content": "x"}]}), "messages[0].role: expected one of"),
    ("conversations", jl({"messages": [{"content": "x"}]}), "messages[0].role"),
    ("conversations", jl({"messages": [{"role": "user"}]}), "messages[0].content: missing"),
    ("conversations", jl({"messages": [{"role": "user", "content": 5}]}), "messages[0].content: expected a string"),
    ("conversations", jl({"messages": [{"role": "user", "content": None}]}), "messages[0].content"),
    ("conversations", jl({"messages": [{"role": "user", "content": []}]}), "messages[0].content: empty list"),
    ("conversations", jl({"messages": [{"role": "user", "content": ["x"]}]}), "messages[0].content[0]: expected"),
    (
        "conversations",
        jl({"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}),
        "messages[0].content[0].type",
    ),
    (
        "conversations",
        jl({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        "messages[0].content[0].text: expected a string",
    ),
    (
        "conversations",
        jl({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "weight": "1"}]}]}),
        "content[0].weight: expected a finite number",
    ),
    (
        "conversations",
        jl({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "weight": True}]}]}),
        "content[0].weight",
    ),
    (
        "conversations",
        jl({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "tag": 3}]}]}),
        "content[0].tag: expected a string",
    ),
    (
        "conversations",
        jl({"messages": [{"role": "user", "content": "a", "weight": "high"}]}),
        "messages[0].weight: expected a finite number",
    ),
    ("conversations", jl({"text": ""}), "text: expected a non-empty string"),
    ("conversations", jl({"text": ["a"]}), "text: expected a non-empty string"),
    ("conversations", b'{"messages": [{"role": "user", "content": NaN}]}\n', "content"),
    ("preference", jl({"prompt": [U], "chosen": [A]}), "rejected: missing"),
    ("preference", jl({"prompt": [U], "chosen": A, "rejected": [A]}), "chosen: expected a non-empty list"),
    ("preference", jl({"prompt": [], "chosen": [A], "rejected": [A]}), "prompt: expected a non-empty list"),
    ("preference", jl({"prompt": [U], "chosen": [A], "rejected": [{"role": "x", "content": "y"}]}), "rejected[0].role"),
    ("preference", jl({"messages": [U, A]}), "prompt: missing"),
]


@pytest.mark.parametrize("purpose,data,expected", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed(purpose, data, expected):
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset(data, purpose, source="train.jsonl")
    assert expected in str(info.value)
    assert "train.jsonl" in str(info.value)


def test_every_bad_line_is_reported_at_once():
    rows = [{"messages": [U, A]}] * 3 + [
        {"messages": [{"role": "robot", "content": "x"}]},
        b"{oops",
        {"text": 3},
        {"messages": [U, A]},
    ]
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset(jl(*rows), "conversations")
    err = info.value
    assert [p.split(":")[0] for p in err.problems] == ["line 4", "line 5", "line 6"]
    for line in ("line 4", "line 5", "line 6"):
        assert line in str(err)


def test_long_lists_are_cut_in_the_message_but_kept_whole():
    data = jl(*[{"text": 1}] * 120)
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset(data, "conversations")
    assert len(info.value.problems) == 120
    assert "and 70 more" in str(info.value)


def test_size_limit():
    with pytest.raises(DatasetValidationError, match="over the limit of 10 bytes"):
        validate_dataset(jl({"text": "long enough"}), "conversations", max_bytes=10)


def test_other_purposes_are_stored_as_given_but_not_empty():
    assert validate_dataset(b"\x00\x01 anything", "custom_job_file") == 0
    with pytest.raises(DatasetValidationError, match="empty"):
        validate_dataset(b"", "custom_job_file")

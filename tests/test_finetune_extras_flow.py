"""The research extras end to end in embedded mode, on one real short training run: token-weighted SFT with a
negative-weight block, logprob tracking and sampling callbacks (events and result files while it trains), then
the logprob job on the trained adapter against a direct computation with transformers."""

import json

import pytest
import torch

from ow_prefect import OpenWeights
from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl
from tests.helpers import eventually
from tests.test_finetune_weighting import split_answer

STEPS = 6


def jsonl(ow, file_id):
    return [json.loads(line) for line in ow.files.content(file_id).decode().splitlines() if line]


@pytest.fixture(scope="module")
def datasets(datasets_dir):
    ow = OpenWeights()
    rows = [split_answer(r, head_weight=1, tail_weight=-1) for r in sample_conversations(16, seed=5)]
    prompts = [{"messages": r["messages"][:2]} for r in sample_conversations(2, seed=6)]
    return {
        "train": ow.files.upload(write_jsonl(rows, datasets_dir / "weighted.jsonl"), "conversations").id,
        "prompts": ow.files.upload(write_jsonl(prompts, datasets_dir / "prompts.jsonl"), "conversations").id,
        "rows": rows,
    }


@pytest.fixture(scope="module")
def job(tiny_model, datasets):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OW_TRAIN_BACKEND", "transformers")
        job = OpenWeights().weighted_sft.create(
            model=str(tiny_model),
            training_file=datasets["train"],
            max_steps=STEPS,
            r=8,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            learning_rate=5e-3,
            warmup_steps=0,
            merge_before_push=False,
            logp_callback_datasets={"train": datasets["train"]},
            eval_every_n_steps=3,
            sampling_callbacks=[{"dataset": datasets["prompts"], "eval_steps": 3, "tag": "arith", "max_tokens": 6}],
        )
    assert job.status == "completed", job.error
    return job


def tail_logprob(rows):
    return sum(m["content"][1]["logprobs"] for r in rows for m in r["messages"] if m["role"] == "assistant")


def test_weighted_sft_job_with_callbacks(job, datasets):
    ow = OpenWeights()
    assert job.id.startswith("ftjob-") and job.type == "weighted_sft"
    logged = job.outputs["logprobs"]["train"]
    assert [r["step"] for r in logged] == [0, 3, STEPS] and all(r["value"] > 0 for r in logged)
    files = job.outputs["files"]
    assert {f"logprobs/train/step-{s:06d}.jsonl" for s in (0, 3, STEPS)} <= set(files)
    assert {f"samples/arith/step-{s:06d}.jsonl" for s in (0, 3, STEPS)} <= set(files)

    first, last = (jsonl(ow, logged[i]["file"]) for i in (0, -1))
    row = first[0]
    assert len(row["tokens"]) > 10 and row["tokens"][0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in row["tokens"][1:])
    assert tail_logprob(last) < tail_logprob(first) - 1.0, "the negative-weight block became less likely"

    samples = jsonl(ow, job.outputs["samples"]["arith"][-1]["file"])
    assert len(samples) == 2 and all(isinstance(s["completion"], str) for s in samples)

    def events(name):
        return [e["payload"] for e in job.events() if e["event"] == name]

    assert eventually(lambda: len(events("ow.train.samples")) >= 3), "events arrive in batches, a moment late"
    assert eventually(lambda: len(events("ow.train.logprob_block")) >= 3 * 2 * 16)
    logprob_events = events("ow.train.logprobs")
    assert [(e["type"], e["tag"], e["step"]) for e in logprob_events] == [("logprobs", "train", s) for s in (0, 3, 6)]
    assert logprob_events[0]["value"] == logged[0]["value"] and logprob_events[0]["file"] == logged[0]["file"]
    block = events("ow.train.logprob_block")[0]
    assert block["type"] == "logprob_block" and block["source"] == "train" and block["tag"] in ("head", "tail")


def test_samples_events_and_outputs_name_the_same_files(job):
    """Upstream's cookbook finds sampling results in the run's events (`step`, `tag`, `file`) and reads each
    file by its id: ours carry the ids job.outputs["samples"] has, one file per step."""
    ow = OpenWeights()
    records = job.outputs["samples"]["arith"]

    def events():
        return [e["payload"] for e in job.events() if e["event"] == "ow.train.samples"]

    assert eventually(lambda: len(events()) >= 3), "events arrive in batches, a moment late"
    named = sorted((e["step"], e["tag"], e["file"]) for e in events())
    assert named == [(r["step"], r["tag"], r["file"]) for r in records] and len({f for *_, f in named}) == 3
    assert all(len(jsonl(ow, file_id)) == 2 for *_, file_id in named)


def direct_block_logprobs(model_dir, adapter_dir, row):
    """Each block's summed logprob, computed here with plain transformers + PEFT, one conversation at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    messages = [
        {
            "role": m["role"],
            "content": m["content"] if isinstance(m["content"], str) else "".join(b["text"] for b in m["content"]),
        }
        for m in row["messages"]
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    sums, cursor = [], 0
    for m in row["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]:
            start = text.index(b["text"], cursor)
            cursor = end = start + len(b["text"])
            sums.append(
                sum(
                    logp[t - 1, ids[0, t]].item()
                    for t, (s, _) in enumerate(encoded["offset_mapping"])
                    if t and start <= s < end
                )
            )
    return sums


def test_logprob_job_matches_transformers(job, datasets, tiny_model, tmp_path):
    ow = OpenWeights()
    lp = ow.logprob.create(model=job.id, dataset=datasets["train"], batch_size=3)
    assert lp.id.startswith("lpjob-") and lp.status == "completed", lp.error
    rows = jsonl(ow, lp.outputs["result_file"])
    assert len(rows) == len(datasets["rows"]) == lp.outputs["rows"]
    adapter = ow.files.download(job.outputs["adapter"], tmp_path / "adapter")
    for row, original in list(zip(rows, datasets["rows"], strict=True))[:4]:
        got = [b["logprobs"] for m in row["messages"] for b in m["content"]]
        assert got == pytest.approx(direct_block_logprobs(tiny_model, adapter, original), abs=1e-3)
        assert row["messages"][0]["content"][0]["text"] == original["messages"][0]["content"]  # strings -> blocks
    again = ow.logprob.create(model=job.outputs["model"], dataset=datasets["train"], batch_size=3)
    assert again.outputs["result_file"] == lp.outputs["result_file"]  # the job id and its outputs: same weights

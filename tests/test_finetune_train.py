"""Real LoRA training on the tiny local model: SFT, DPO, ORPO, masking, evaluation, checkpoints, resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from flows.finetune import data, train
from ow_prefect.jobs.finetune import FineTuningParams
from ow_prefect.storage import LocalBackend, Storage
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("transformers_backend")
FILE = {
    "sft": "conversations:file-0123456789ab",
    "dpo": "preference:file-0123456789ab",
    "orpo": "preference:file-0123456789ab",
}


@pytest.fixture
def transformers_backend(monkeypatch):
    # unsloth patches transformers when imported: keep it out of this process (its own test runs in a subprocess)
    monkeypatch.setenv("OW_TRAIN_BACKEND", "transformers")


def config(tiny_model, loss="sft", **kwargs) -> FineTuningParams:
    return FineTuningParams(
        **{
            "model": str(tiny_model),
            "training_file": FILE[loss],
            "loss": loss,
            "max_steps": 6,
            "r": 8,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3,
            "save_steps": 1000,
            "warmup_steps": 0,
            "merge_before_push": False,
            **kwargs,
        }
    )


def data_file(datasets_dir, loss):
    return datasets_dir / ("conversations.jsonl" if loss == "sft" else "preference.jsonl")


def logits(model_dir, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 42, 99, 7]])).logits


@pytest.mark.parametrize("loss", ["sft", "dpo", "orpo"])
def test_training_changes_the_adapter_and_the_logits(loss, tiny_model, datasets_dir, tmp_path):
    result = train.main(config(tiny_model, loss), data_file(datasets_dir, loss), None, tmp_path)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 6 and result.backend == "transformers"
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b), "lora_B starts at zero and must have moved"
    assert not torch.allclose(logits(tiny_model), logits(tiny_model, result.adapter_dir))


def test_sft_loss_goes_down(tiny_model, datasets_dir, tmp_path):
    result = train.main(
        config(tiny_model, max_steps=20, learning_rate=5e-3), data_file(datasets_dir, "sft"), None, tmp_path
    )
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_responses_only_labels_cover_exactly_the_assistant_turns(tiny_model, datasets_dir, tmp_path):
    from transformers import AutoTokenizer

    cfg = config(tiny_model)
    loaded = train.backends.load(cfg)
    trainer = train.build_trainer(cfg, loaded, data_file(datasets_dir, "sft"), None, tmp_path, [])
    row = json.loads(data_file(datasets_dir, "sft").read_text().splitlines()[0])
    example = trainer.train_dataset[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    trained = tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    )
    assert trained == row["messages"][-1]["content"] + "<|im_end|>"  # not the newline after it, as upstream
    assert sum(label != -100 for label in example["labels"]) < len(example["labels"]) / 2


def test_masks_need_no_generation_markers_and_handle_several_turns(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), data.CHATML_TEMPLATE)
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": [{"type": "text", "text": "tw"}, {"type": "text", "text": "o"}]},
        ]
    }
    [out] = data.sft_examples(tokenizer, row, responses_only=True)
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])
    assert trained == "one<|im_end|>two<|im_end|>"
    [everything] = data.sft_examples(tokenizer, row, responses_only=False)
    assert all(everything["assistant_masks"])


def test_text_rows_train_on_every_token(tiny_model, datasets_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    [out] = data.sft_examples(tokenizer, {"text": "The cat is blue."}, responses_only=True)
    assert all(out["assistant_masks"]) and out["input_ids"][-1] == tokenizer.eos_token_id
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data_file(datasets_dir, "sft").read_text() + json.dumps({"text": "Plain text row."}) + "\n")
    assert train.main(config(tiny_model, max_steps=2), mixed, None, tmp_path / "out").global_step == 2


UNSTABLE = (  # the last message in <role>, earlier ones in [role]: a turn renders otherwise once others follow
    "{%- for m in messages %}{%- if loop.last %}<{{ m['role'] }}>{{ m['content'] }}{%- else %}"
    "[{{ m['role'] }}]{{ m['content'] }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<assistant>{%- endif %}"
)


def test_template_that_renders_the_last_turn_differently_trains_each_turn_as_it_is_generated(tiny_model):
    """Not prefix-stable (the row rendered up to turn 1 is not a prefix of the whole row): turn 1 trains in the
    conversation cut after it, where it is the last turn as when it is generated; the row trains turn 3."""
    from transformers import AutoTokenizer

    tokenizer = data.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model), UNSTABLE)
    turns = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    row = {"messages": [{"role": role, "content": content} for role, content in turns]}
    found = []
    for out in data.sft_examples(tokenizer, row, responses_only=True):
        ids, mask = out["input_ids"], out["assistant_masks"]
        first = mask.index(1)
        found.append(
            (tokenizer.decode(ids[:first]), [tokenizer.decode([t]) for t, m in zip(ids, mask, strict=True) if m])
        )
    assert found == [("[user]a<assistant>", ["b"]), ("[user]a[assistant]b[user]c<assistant>", ["d"])]


def test_examples_not_rows_set_the_steps_and_the_evaluation(tiny_model, tmp_path):
    """A row whose earlier turn trains in an example of its own is two examples: an epoch, the number of steps
    and the evaluation go by examples; a row all of whose turns train elsewhere is not an example itself."""
    rows = [
        {"messages": [{"role": r, "content": f"{r} {n}"} for r in ("user", "assistant", "user", "assistant")]}
        for n in range(5)
    ]
    rows.append({"messages": [{"role": r, "content": r} for r in ("user", "assistant", "user")]})  # 1 example
    path = tmp_path / "train.jsonl"
    path.write_bytes(data.jsonl_bytes(rows))
    cfg = config(
        tiny_model,
        max_steps=None,
        epochs=2,
        chat_template=UNSTABLE,
        test_file=FILE["sft"],
        test_file_eval_strategy="epoch",
    )
    result = train.main(cfg, path, path, tmp_path / "out")
    assert (result.train_rows, result.train_examples, result.eval_examples) == (6, 11, 11)
    assert result.global_step == 2 * 3  # 2 epochs of ceil(11 / 4) steps
    assert [h["epoch"] for h in result.log_history if "eval_loss" in h] == [1.0, 2.0]


def test_missing_pad_token_and_chat_template_are_filled_in(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    data.prepare_tokenizer(tokenizer, "default")
    assert tokenizer.pad_token in (tokenizer.unk_token, tokenizer.eos_token) and tokenizer.pad_token is not None
    assert tokenizer.chat_template == data.CHATML_TEMPLATE


def test_test_file_evaluation(tiny_model, datasets_dir, tmp_path):
    cfg = config(tiny_model, test_file=FILE["sft"], test_file_eval_strategy="steps", test_file_eval_steps=3)
    result = train.main(cfg, data_file(datasets_dir, "sft"), data_file(datasets_dir, "sft"), tmp_path)
    assert [h["step"] for h in result.log_history if "eval_loss" in h] == [3, 6]
    assert result.eval_loss is not None and result.eval_loss > 0


def test_merged_model_gives_the_adapters_logits(tiny_model, datasets_dir, tmp_path):
    result = train.main(config(tiny_model, merge_before_push=True), data_file(datasets_dir, "sft"), None, tmp_path)
    assert torch.allclose(logits(result.merged_dir), logits(tiny_model, result.adapter_dir), atol=1e-4)


class Crash(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise RuntimeError("simulated preemption")


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_checkpoints_go_to_storage_and_a_rerun_resumes_from_the_newest(tiny_model, datasets_dir, tmp_path):
    from flows.finetune.reporting import CheckpointSync

    storage = Storage(LocalBackend(tmp_path / "storage"))
    cfg = config(tiny_model, save_steps=2)
    sync = CheckpointSync("ftjob-test", storage)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train.main(cfg, data_file(datasets_dir, "sft"), None, tmp_path / "first", callbacks=[sync, Crash(5)])
    assert len(sync.uploaded) == 2

    resume = CheckpointSync.restore("ftjob-test", storage, tmp_path / "second")
    assert resume is not None and resume.name == "checkpoint-4"
    counter = CountSteps()
    result = train.main(
        cfg, data_file(datasets_dir, "sft"), None, tmp_path / "second", resume_from=resume, callbacks=[counter]
    )
    assert (result.resumed_from_step, result.global_step, counter.steps) == (4, 6, 2)
    sync.finish()
    assert CheckpointSync.restore("ftjob-test", storage, tmp_path / "third") is None


def test_unsloth_backend_through_the_standalone_entry_point(tiny_model, datasets_dir, tmp_path):
    """unsloth (its CPU fallback here) patches transformers on import, so it gets its own process."""
    pytest.importorskip("unsloth")
    cfg = {
        "model": str(tiny_model),
        "training_file": str(data_file(datasets_dir, "sft")),
        "max_steps": 3,
        "r": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-3,
        "merge_before_push": False,
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OW_TRAIN_BACKEND": "unsloth"}
    out = subprocess.run(
        [sys.executable, "-m", "flows.finetune.train", "--config", str(tmp_path / "cfg.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=str(ROOT),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "unsloth" and result["steps"] == 3
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()

"""Fine-tuning parameters: defaults, normalisation and cross-field rules, all checked before submission."""

import pytest

from ow_prefect import OpenWeights, ParameterError
from ow_prefect.jobs.finetune import FineTuneJob, FineTuningParams, WeightedSFTJob
from ow_prefect.jobs.vram import estimate_vram_gb, parameter_count

CONV = "conversations:file-0123456789ab"
PREF = "preference:file-0123456789ab"


def params(**kwargs) -> FineTuningParams:
    return FineTuningParams(**{"model": "org/model", "training_file": CONV, **kwargs})


def test_defaults_follow_openweights():
    p = params()
    assert (p.loss, p.r, p.lora_alpha, p.use_rslora, p.epochs, p.learning_rate, p.optim) == (
        "sft",
        16,
        16,
        True,
        1,
        1e-4,
        "adamw_8bit",
    )
    assert p.train_on_responses_only and p.merge_before_push and p.push_to_private
    # what the parameters determine is filled in when validated; {org} and {job_id} when they are known
    assert p.finetuned_model_id == "{org}/model-{job_id}"


@pytest.mark.parametrize(
    "given,expected",
    [(2e-4, 2e-4), ("2e-4", 2e-4), (-4, 1e-4), ("-3", 1e-3), (1, 1.0), ("2e-5*4", 8e-5), ("10**-4", 1e-4)],
)
def test_learning_rate_forms_normalise_to_one_value(given, expected):
    assert params(learning_rate=given).learning_rate == pytest.approx(expected)


def test_equal_learning_rates_give_equal_job_ids():
    ids = {
        OpenWeights().fine_tuning.validate(model="m", training_file=CONV, learning_rate=lr)
        for lr in (1e-4, "1e-4", -4, "0.0001")
    }
    assert len(ids) == 1 and next(iter(ids)).startswith("ftjob-")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"wrong_key": 1}, "wrong_key: Extra inputs are not permitted"),
        ({"training_file": PREF}, "loss='sft' needs a 'conversations' file"),
        ({"loss": "dpo"}, "loss='dpo' needs a 'preference' file"),
        ({"loss": "orpo", "training_file": PREF, "test_file": CONV}, "test_file: loss='orpo' needs a 'preference'"),
        ({"lora_dropout": 2}, "lora_dropout: Input should be less than or equal to 1"),
        ({"learning_rate": 0}, "learning_rate must not be 0"),
        ({"learning_rate": "fast"}, "is not a number"),
        ({"learning_rate": "__import__('os').getcwd()"}, "is not a number or an arithmetic expression"),
        ({"is_peft": False}, "is_peft=False: ow_prefect trains LoRA adapters only"),
        ({"sdft_ema_alpha": 0.02}, "sdft_ema_alpha: ow_prefect has no loss='sdft'"),
        ({"finetuned_model_id": "{org_id}/{typo}"}, "add them to model_naming_extra_parameters"),
        ({"training_file": "train.jsonl"}, "is not a file id; upload it with ow.files.upload"),
        ({"load_in_4bit": True, "merge_before_push": True}, "merge_before_push cannot be used with load_in_4bit"),
        ({"finetuned_model_id": "{user}/x"}, "unknown placeholder(s) ['user']"),
        ({"finetuned_model_id": "just-a-name"}, "must look like 'org/name'"),
        ({"test_file": CONV, "test_file_eval_strategy": "steps"}, "needs test_file_eval_steps"),
        ({"loss": "ppo"}, "loss: Input should be 'sft', 'dpo', 'orpo' or 'weighted_sft'"),
        ({"loss": "weighted_sft"}, "loss: 'weighted_sft' belongs to job type weighted_sft: use ow.weighted_sft.create"),
        (
            {"load_in_4bit": True, "merge_before_push": False, "logp_callback_datasets": {"a": CONV}},
            "logp_callback_datasets cannot be used with load_in_4bit=True",
        ),
        ({"logp_callback_datasets": {"a": PREF}}, "logp_callback_datasets['a']: 'preference:file-0123456789ab' is not"),
        ({"logp_callback_datasets": {"a/b": CONV}}, "logp_callback_datasets: tag 'a/b' must be"),
        ({"eval_every_n_steps": 0}, "eval_every_n_steps: 0 must be at least 1"),
        ({"sampling_callbacks": [{"dataset": PREF}]}, "sampling_callbacks.0: Value error, dataset: 'preference:"),
        ({"sampling_callbacks": [{"dataset": CONV, "eval_steps": 0}]}, "eval_steps: 0 must be at least 1"),
        ({"sampling_callbacks": [{"dataset": CONV}, {"dataset": CONV}]}, "tags ['samples', 'samples'] repeat"),
        ({"job_id_suffix": "Has Spaces"}, "job_id_suffix"),
    ],
)
def test_bad_configs_fail_at_validation_with_the_field_named(kwargs, message):
    with pytest.raises(ParameterError) as info:
        OpenWeights().fine_tuning.validate(**{"model": "org/model", "training_file": CONV, **kwargs})
    assert message in str(info.value)


def test_four_bit_turns_merging_off_by_default():
    assert params(load_in_4bit=True).merge_before_push is False


def test_deployment_and_suffix():
    assert FineTuneJob.deployment_for(params(loss="dpo", training_file=PREF)) == "finetune/dpo"
    job_id = OpenWeights().fine_tuning.validate(model="m", training_file=CONV, job_id_suffix="run-2")
    assert job_id.endswith("-run-2")


def test_weighted_sft_is_its_own_job_type_on_its_own_deployment():
    ow = OpenWeights()
    validated = ow.weighted_sft.validate(model="m", training_file=CONV)
    assert validated.startswith("ftjob-")  # inference, APIs and evals take it like any fine-tuning job
    params = WeightedSFTJob.validate_params(model="m", training_file=CONV)
    assert params.loss == "weighted_sft" and WeightedSFTJob.deployment_for(params) == "finetune/weighted-sft"
    with pytest.raises(ParameterError, match="packing: weighted SFT keeps each row's token weights apart"):
        ow.weighted_sft.validate(model="m", training_file=CONV, packing=True)
    with pytest.raises(ParameterError, match="needs a 'conversations' file"):
        ow.weighted_sft.validate(model="m", training_file=PREF)


def test_callbacks_are_parameters_with_openweights_defaults():
    p = params(logp_callback_datasets={"heldout": CONV}, sampling_callbacks=[{"dataset": CONV, "eval_steps": 5}])
    assert p.eval_every_n_steps == "log"
    spec = p.sampling_callbacks[0]
    assert (spec.tag, spec.temperature, spec.max_tokens, spec.batch_size) == ("samples", 0.0, 600, 8)


def test_parameter_count_from_config_matches_the_model(tiny_model):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_model / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_vram_estimate_from_config_and_name(tmp_path):
    import json

    seven_b = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(seven_b))
    assert 6.5e9 < parameter_count(seven_b) < 7e9
    full = estimate_vram_gb(str(tmp_path), load_in_4bit=False, max_seq_length=2048, batch_size=2)
    quantized = estimate_vram_gb(str(tmp_path), load_in_4bit=True, max_seq_length=2048, batch_size=2)
    assert 15 <= full <= 24 and quantized < full / 2
    assert (
        estimate_vram_gb("nowhere/Some-Model-70B-Instruct", load_in_4bit=False, max_seq_length=2048, batch_size=2) > 150
    )
    assert estimate_vram_gb("nowhere/unnamed", load_in_4bit=False, max_seq_length=2048, batch_size=2) == 24


def test_vram_is_a_job_variable_and_can_be_overridden(tiny_model):
    assert FineTuneJob.job_variables(params(model=str(tiny_model))) == {"min_vram_gb": 2}
    assert FineTuneJob.job_variables(params(requires_vram_gb=80)) == {"min_vram_gb": 80}


def test_openweights_model_id_placeholders_are_filled_as_far_as_known(monkeypatch):
    """{model_name}, string parameters and model_naming_extra_parameters when validated (the same in the flow, so
    the same id); {org_id} / {org} by the client when it knows the organization; {job_id} when the job is shown."""
    template = "{org_id}/{model_name}-{loss}-{tag}-{job_id}"
    p = params(finetuned_model_id=template, model_naming_extra_parameters={"tag": "x"}, ft_id_suffix="v2")
    assert (p.finetuned_model_id, p.ft_id_suffix) == ("{org_id}/model-sft-x-{job_id}-v2", None)
    assert FineTuningParams(**p.model_dump()).finetuned_model_id == p.finetuned_model_id  # validated again: same
    monkeypatch.delenv("OW_HF_ORG", raising=False)
    monkeypatch.setenv("HF_USER", "someone")
    prepared = FineTuneJob.prepare_params({"finetuned_model_id": template}, storage=None)
    assert prepared["finetuned_model_id"] == "someone/{model_name}-{loss}-{tag}-{job_id}"
    shown = FineTuneJob.shown_params({"finetuned_model_id": "someone/model-{job_id}"}, "ftjob-0123456789ab")
    assert shown["finetuned_model_id"] == "someone/model-ftjob-0123456789ab"


def test_openweights_no_op_fields_are_dropped_and_weighted_sft_takes_loss_sft():
    ow = OpenWeights()
    plain = ow.fine_tuning.validate(model="m", training_file=CONV)
    assert ow.fine_tuning.validate(model="m", training_file=CONV, is_peft=True, output_dir="./tmp") == plain
    assert WeightedSFTJob.validate_params(model="m", training_file=CONV, loss="sft").loss == "weighted_sft"
    assert ow.weighted_sft.validate(model="m", training_file=CONV, loss="sft") == ow.weighted_sft.validate(
        model="m", training_file=CONV
    )

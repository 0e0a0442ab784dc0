"""Run every bench (bench/*.py with a `__main__` block) one after another and print ONE table of their results.

    .venv/bin/python bench/run.py [--only chat,gpu_cost] [--quick] [--save results.json]

Each bench's own output streams through as it runs; its last line (`BENCH_RESULT {...}`, see bench/results.py)
is what the table shows: bench, metric, ours, baseline, ratio (ours / baseline), goal, met. `--quick` passes
smaller sizes to each bench (a smoke run: its figures are noisier). The exit status is 1 when a bench failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bench.results import parse, table  # noqa: E402

QUICK_ARGS = {
    "submit": ["--n", "10"],
    "train_cpu": ["--steps", "60", "--repeats", "3"],
    "worker": ["--jobs", "4"],
    "chat": ["--requests", "500", "--queued", "10000"],
}


def benches() -> list[Path]:
    return [path for path in sorted(BENCH.glob("*.py")) if path.name != "run.py" and "__main__" in path.read_text()]


def run_one(path: Path, quick: bool) -> tuple[dict | None, str | None]:
    """Run one bench, echoing its output; (its result, None) or (None, why it failed)."""
    command = [sys.executable, str(path), *(QUICK_ARGS.get(path.stem, []) if quick else [])]
    print(f"\n=== {path.name} ({' '.join(command[2:]) or 'defaults'})", flush=True)
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    output = []
    for line in process.stdout:
        print(line, end="", flush=True)
        output.append(line)
    code = process.wait()
    print(f"=== {path.name}: {time.monotonic() - start:.0f} s, exit {code}", flush=True)
    result = parse("".join(output))
    if code != 0:
        return None, f"exit status {code}"
    if result is None:
        return None, "no BENCH_RESULT line"
    return result, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated bench names (file stems), e.g. chat,gpu_cost")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    parser.add_argument("--save", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    selected = benches()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {path.stem for path in selected}
        if unknown:
            sys.exit(f"--only: no bench named {sorted(unknown)}; benches: {[p.stem for p in selected]}")
        selected = [path for path in selected if path.stem in wanted]
    results, failures = [], {}
    for path in selected:
        result, failure = run_one(path, args.quick)
        if result:
            results.append(result)
        else:
            failures[path.stem] = failure
    print("\n" + table(results, failures))
    if args.save:
        args.save.write_text(json.dumps({"results": results, "failures": failures}, indent=2))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

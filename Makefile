# The two commands of the README. Both set up what is missing first (scripts/setup).
.PHONY: setup demo test lint bench

setup:
	@./scripts/setup

# The main job on the embedded default: no Prefect server, no worker, no cloud.
demo: setup
	OW_MODE=embedded .venv/bin/python examples/quickstart/finetune.py

test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# Every bench/*.py, then one table of ratios against their baselines (bench/README.md).
bench: setup
	.venv/bin/python bench/run.py

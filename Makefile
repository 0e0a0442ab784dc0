# The two commands of the README. Both set up what is missing first (scripts/setup).
.PHONY: setup demo test test-fast lint bench

setup:
	@./scripts/setup

# The main job on the embedded default: no Prefect server, no worker, no cloud.
demo: setup
	OW_MODE=embedded .venv/bin/python examples/quickstart/finetune.py

# The whole suite, three pytest processes (pytest-xdist; tests/conftest.py says how modules are grouped): 19.5-21
# minutes on the 2-core machine of Dec 1 (two processes: 24.5 minutes there, the cores idle 15% of the time; four:
# 20.8, 18% more CPU; each process starts its own Prefect server and workers). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: setup
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=25

# The inner loop: everything not marked `slow` (no vLLM, no RunPod fault scenarios) and no network (`registry`);
# under 5 minutes.
test-fast: setup
	.venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not registry and not gpu and not live_runpod and not load"

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# Every bench/*.py, then one table of ratios against their baselines (bench/README.md).
bench: setup
	.venv/bin/python bench/run.py

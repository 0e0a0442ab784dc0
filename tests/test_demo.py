"""`make demo`, run as the README says, in a fresh home: it trains, its answers after training are right, and it
ends by saying what to try next."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_make_demo_answers_right_after_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "OW_TRAIN_BACKEND"}
    env |= {"OW_HOME": str(tmp_path / "ow-home"), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    result = subprocess.run(
        [shutil.which("make") or "make", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for question, answer in (("two", "Three."), ("seven", "Eight."), ("four", "Five.")):
        assert f"What is {question} plus one?\n  before: ''\n  after:  {answer!r}  right" in out, out[-3000:]
    assert "3/3 right after training (0/3 before)" in out
    # the trainer's steps reach the run's logs (here, Prefect's console handler)
    assert "step 120/120  loss " in out
    next_steps = out[out.index("What to try next:") :]
    for hint in ("ow show ftjob-", "prefect server start", "/runs/flow-run/", "docs/local.md", "--pool gpu"):
        assert hint in next_steps, hint

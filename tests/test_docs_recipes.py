"""The docs' command blocks, run as a user runs them: docs/local.md's (and the README's copy of it) on a Prefect
server without a RunPod key, then docs/runpod.md's whole GPU recipe against the fake RunPod (`ow setup`, `deploy
--all`, a `runpod` worker, `prefect deployment run finetune/dpo ... --watch` training the tiny model in a pod).

The module has its own Prefect server (with the UI, for tests/test_ui.py's kind of check) because `ow setup` and
`deploy --all` change the server-wide pools and deployments that other modules rely on. Lines run through bash
exactly as written, except the fixed port of the fake (a free one) and a Prefect server the fixture started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deployments.register import load_deployments
from ow_prefect.testing.servers import PortTaken, _stop, free_port, prefect_server
from tests.conftest import ROOT
from tests.helpers import eventually

pytestmark = pytest.mark.slow

FAKE_PORT = "8321"  # docs/runpod.md's port for the fake; replaced by a free one here


def doc_block(path: Path, after: str) -> list[str]:
    """The command lines (comments and blank lines dropped) of the first ```bash block after the line `after`."""
    text = path.read_text()
    start = text.index(after)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    lines = [re.split(r"\s+#\s", line, maxsplit=1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


class Shell:
    """One bash session, line by line: `export` changes the environment of later lines, a trailing `&` starts a
    background process (stopped on close, last first), every other line must exit 0 (its output is returned)."""

    def __init__(self, env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.env, self.cwd, self.logs = env, cwd, logs
        self.background: list[tuple[subprocess.Popen, Path]] = []

    def run(self, line: str, timeout: float = 600) -> str:
        if line.startswith("export "):
            for assignment in shlex.split(self._expand(line.removeprefix("export "))):
                name, _, value = assignment.partition("=")
                self.env[name] = value
            return ""
        if line.endswith("&"):
            log = self.logs / f"background-{len(self.background)}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    ["bash", "-c", line.removesuffix("&").strip()],
                    cwd=self.cwd,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.background.append((proc, log))
            return ""
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        print(f"[{time.monotonic() - started:5.1f} s] {line}")
        assert result.returncode == 0, (
            f"`{line}` exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
        return result.stdout

    def _expand(self, text: str) -> str:
        return re.sub(
            r"\$(\w+)", lambda m: self.env.get(m.group(1), str(self.cwd) if m.group(1) == "PWD" else ""), text
        )

    def log_of(self, index: int) -> str:
        return self.background[index][1].read_text(errors="replace")

    def close(self) -> None:
        for proc, _ in reversed(self.background):
            _stop(proc, timeout=30)


@pytest.fixture(scope="module")
def docs_server(session_dir, prefect_database):
    """A Prefect server for this module only, with its UI on."""
    for attempt in range(3):  # a free port can be lost to the other pytest process's server before ours binds it
        port = free_port()
        env = {"PREFECT_SERVER_UI_ENABLED": "true", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
        try:
            home = session_dir / f"prefect-docs-server-{attempt}"
            server = prefect_server(home, port=port, env=env, database_template=prefect_database)
            url = server.__enter__()
        except (PortTaken, RuntimeError):
            if attempt == 2:
                raise
            continue
        try:
            yield url
        finally:
            server.__exit__(None, None, None)
        return


@pytest.fixture(scope="module")
def shell_env(docs_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("docs-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "PYTEST_"))}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_API_URL": docs_server,
    }
    return env


def client_for(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextlib.contextmanager
    def opened():
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            yield client

    return opened()


def test_local_recipe_registers_every_deployment_without_a_runpod_key(docs_server, shell_env, tmp_path):
    local = doc_block(ROOT / "docs/local.md", "## With a server and a worker")
    readme = doc_block(ROOT / "README.md", "a `process` worker ([docs/local.md](docs/local.md))")
    assert readme == [line for line in local if line != "scripts/setup"], "the README's copy differs from local.md's"
    assert any(line.startswith(".venv/bin/prefect server status --wait") for line in local), local
    shell = Shell(dict(shell_env), ROOT, tmp_path)
    try:
        for line in local:
            if line == "scripts/setup" or "prefect server start" in line:
                continue  # the venv exists; the fixture's server stands in for the one the docs start
            if line.startswith("export PREFECT_API_URL="):
                continue  # same: the fixture's URL is in the environment
            out = shell.run(line)
            if "prefect server status --wait" in line:  # the docs wait for the server they started
                assert "Server is available" in out, out
            if "ow setup" in line:
                assert "work pool 'gpu' (type runpod): created, no credentials" in out, out
        with client_for(docs_server) as client:
            assert client.read_deployment_by_name("finetune/sft-local").work_pool_name == "local"
            gpu = client.read_deployment_by_name("finetune/dpo")
            assert gpu.work_pool_name == "gpu" and gpu.job_variables["min_cuda_version"] == "13.0"
            properties = client.read_work_pool("gpu").base_job_template["variables"]["properties"]
            assert properties["credentials"].get("default") is None  # a pool without a RunPod key
            assert len(client.read_deployments()) == len(load_deployments())  # all of prefect.yaml
        # the local worker the docs started runs a job
        out = shell.run("prefect deployment run custom/run-local --param entrypoint='echo recipe-ok' --watch")
        assert "Completed" in out, out
    finally:
        shell.close()


def test_gpu_pool_without_a_key_fails_its_runs_with_one_clear_line(docs_server, shell_env, tmp_path):
    """`ow setup` without RUNPOD_API_KEY made the `gpu` pool without credentials: its worker says what is
    missing, on the run and in one log line, and creates nothing. It registers what it runs itself (the pools and
    `custom/run`, as docs/local.md does) rather than count on the recipe test before it: a CI run once found
    `custom/run` missing here though that test had passed."""
    shell = Shell(dict(shell_env), ROOT, tmp_path)
    try:
        shell.run("ow setup")
        shell.run("prefect --no-prompt deploy --name run")  # prefect.yaml's `run`: custom/run
        shell.run("prefect worker start --pool gpu &")
        shell.run("prefect deployment run custom/run --param entrypoint='echo never'")
        with client_for(docs_server) as client:

            def failed():
                runs = runs_of(client, "custom/run")
                return runs and runs[0].state.is_final() and runs[0]

            run = eventually(failed, timeout=120)
            assert run and run.state.name == "NoCredentials", run and run.state
            assert "no RunPod credentials" in run.state.message and "RUNPOD_API_KEY" in run.state.message
        log = shell.log_of(0)
        assert "NoCredentials: no RunPod credentials" in log and "Traceback" not in log, log[-3000:]
    finally:
        shell.close()


@pytest.fixture(scope="module")
def gpu_recipe(docs_server, shell_env, tmp_path_factory):
    """docs/runpod.md's fake-RunPod recipe, line by line; yields (the finished DPO flow run, the fake's pods URL,
    the shell). Module-scoped: the recipe test and the UI check share one run (a few minutes on 2 cores)."""
    lines = doc_block(ROOT / "docs/runpod.md", "## Try it on the fake RunPod")
    port = str(free_port())
    shell = Shell(dict(shell_env), ROOT, tmp_path_factory.mktemp("gpu-recipe"))
    outputs = {}
    url = f"http://127.0.0.1:{port}/v2/pods"
    try:
        for line in lines:
            line = line.replace(FAKE_PORT, port)
            outputs[line] = shell.run(line)
            if "fake_runpod" in line:  # wait until it serves, as a user waits for its first line
                assert eventually(lambda: _answers(url, FAKE_HEADERS), timeout=60), shell.log_of(0)
        upload = next(out for line, out in outputs.items() if line.startswith("ow files upload"))
        assert upload.strip() in lines[-1], f"the docs name another file id than `ow files upload` printed: {upload}"
        with client_for(docs_server) as client:
            (run,) = runs_of(client, "finetune/dpo")
        yield run, url, shell
    finally:
        shell.close()


FAKE_HEADERS = {"Authorization": "Bearer fake-key"}  # the recipe's RUNPOD_API_KEY


def runs_of(client, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deployment_id = client.read_deployment_by_name(deployment).id
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def artifacts_of(client, flow_run_id) -> list:
    """The run's artifacts, newest first (the worker writes the cost table once the pod is deleted, a moment after
    the run's final state)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    return client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
        sort=ArtifactSort.CREATED_DESC,
    )


def cost_table_of(client, flow_run_id):
    return next((a for a in artifacts_of(client, flow_run_id) if a.key == f"runpod-cost-{flow_run_id}"), None)


def _answers(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(900)  # the recipe (when this test runs first) plus the checks, on a loaded machine
def test_gpu_recipe_trains_in_a_fake_pod_and_deletes_it(gpu_recipe, docs_server):
    run, pods_url, shell = gpu_recipe
    worker_log = shell.log_of(1)
    assert run.state.is_completed(), f"{run.state}\n{worker_log[-4000:]}"
    pods_left = eventually(lambda: not httpx.get(pods_url, headers=FAKE_HEADERS).json()["pods"], timeout=60)
    assert pods_left, httpx.get(pods_url, headers=FAKE_HEADERS).json()  # the pod was deleted when the run ended
    assert "Traceback" not in worker_log, worker_log[-4000:]
    assert re.search(r"Pod \S+ created: 1x NVIDIA A100 80GB PCIe", worker_log), worker_log[-4000:]
    with client_for(docs_server) as client:
        cost = eventually(lambda: cost_table_of(client, run.id), timeout=60)
        assert cost and cost.type == "table" and "RunPod cost: $" in cost.description, cost
        (row,) = json.loads(cost.data)
        assert row["gpu"] == "1x NVIDIA A100 80GB PCIe" and row["cost_usd"] > 0, row
        types = [artifact.type for artifact in artifacts_of(client, run.id)]
        assert "image" in types, types  # the loss curve


CHROMIUM = "/usr/bin/chromium"  # Debian's (.ci/run installs it); never `playwright install`
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Console errors that are the Prefect UI's own, not ours: Chromium asks every site for /favicon.ico, which the
# Prefect server does not serve (404); and the UI sets the tab's icon to `/ico/<state type>.svg`, which on pages
# without a flow-run state (an artifact's page) is /ico/undefined.svg (404). Nothing else is ignored; the UI made
# no request that needed the internet.
UI_NOISE = ("/favicon.ico", "/ico/undefined.svg")


@pytest.mark.timeout(900)  # alone (`-k the_ui`) it runs the recipe first
def test_the_ui_shows_the_dpo_form_and_the_finished_runs_artifacts(gpu_recipe, docs_server, tmp_path):
    """Headless chromium on the Prefect UI at 1400 px: the `finetune/dpo` run form (user fields first, `ow_job`
    last and titled), the recipe's finished run's Artifacts tab, its cost table (the columns that matter in view)
    and its loss curve, with no page errors and no console errors. With OW_UPDATE_SCREENSHOTS=1 the screenshots
    replace docs/img/'s (shown in the README and docs/runpod.md)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    run, _, _ = gpu_recipe
    ui = docs_server.removesuffix("/api")
    out = ROOT / "docs" / "img" if os.environ.get("OW_UPDATE_SCREENSHOTS") else tmp_path
    with client_for(docs_server) as client:
        deployment = client.read_deployment_by_name("finetune/dpo")
        cost = eventually(lambda: cost_table_of(client, run.id), timeout=60)
        assert cost, artifacts_of(client, run.id)
        loss_curve = next(a for a in artifacts_of(client, run.id) if a.key.endswith("-loss-curve"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on(
                "console",
                lambda message: (
                    message.type == "error"
                    and not message.location.get("url", "").endswith(UI_NOISE)
                    and errors.append(f"console error: {message.text} ({message.location.get('url')})")
                ),
            )

            page.goto(f"{ui}/deployments/deployment/{deployment.id}/run", wait_until="networkidle", timeout=120_000)
            page.get_by_text("ow_job (set by the ow_prefect SDK)").wait_for(timeout=60_000)
            form = page.inner_text("body")
            assert (
                form.index("training_file") < form.index("max_steps") < form.index("ow_job (set by the ow_prefect SDK)")
            )
            assert "dpo and orpo train on a 'preference' file" in form  # the loss field's description
            page.screenshot(path=str(out / "ui-run-form.png"))

            # the run's Artifacts tab (the UI opens a run on its Logs tab whatever ?tab= says: click it), tall
            # enough for the flow run's cost table and the task run's loss curve, metrics and progress
            page.set_viewport_size({"width": 1400, "height": 1200})
            page.goto(f"{ui}/runs/flow-run/{run.id}", wait_until="networkidle", timeout=120_000)
            page.locator("li.p-tab#artifacts").click()
            page.get_by_text(f"runpod-cost-{run.id}").first.wait_for(timeout=60_000)
            page.get_by_text(loss_curve.key).first.wait_for(timeout=60_000)
            tab = page.inner_text("body")
            assert "RunPod cost: $" in tab and "-metrics" in tab and "-progress" in tab, tab[-2000:]
            page.screenshot(path=str(out / "ui-run-artifacts.png"))

            page.set_viewport_size({"width": 1400, "height": 700})
            page.goto(f"{ui}/artifacts/artifact/{cost.id}", wait_until="networkidle", timeout=120_000)
            header = page.locator("th", has_text="cost_usd")
            header.wait_for(timeout=60_000)
            scroller = page.locator("table").locator("xpath=..").bounding_box()  # the table scrolls in it
            for column in ("cost_usd", "gpu", "billed_seconds", "usd_per_hour", "cloud", "data_center"):
                box = page.locator("th", has_text=column).first.bounding_box()
                assert box["x"] + box["width"] <= min(scroller["x"] + scroller["width"], 1400), (column, box, scroller)
            first_row = page.locator("tbody tr").first.inner_text()
            assert "1x NVIDIA A100 80GB PCIe" in first_row and "SECURE" in first_row, first_row
            page.screenshot(path=str(out / "ui-cost-table.png"))

            page.goto(f"{ui}/artifacts/artifact/{loss_curve.id}", wait_until="networkidle", timeout=120_000)
            image = page.locator("img[src^='data:image/svg+xml']")
            image.wait_for(timeout=60_000)
            assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", image.element_handle())
            plot = image.bounding_box()  # down to the plot: below it the UI prints the data: URL across the page
            page.screenshot(
                path=str(out / "ui-loss-curve.png"),
                clip={"x": 0, "y": 0, "width": 1400, "height": plot["y"] + plot["height"] + 16},
            )
            assert not errors, errors
        finally:
            browser.close()

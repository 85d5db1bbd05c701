"""The `nietest` command line (DESIGN.md §3)."""

from __future__ import annotations

import argparse
import sys

from nietest_daemon import settings as settings_module
from nietest_daemon.settings import QUEUE_KEYS, SettingsError

DESCRIPTION = """\
nietest runs Nieta image-generation test campaigns on Dramatiq workers kept alive by supervisord.
All configuration comes from environment variables (see README.md, "Configuration");
a bad value stops any command with one line naming the variable."""

EPILOG = """\
examples:
  nietest daemon                     run supervisord and every worker in the foreground
  nietest status                     processes, queue depths, broker and store in use
  nietest ctl stop subtask:*         stop one queue's workers (any supervisorctl command)
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
    ctl = sub.add_parser(
        "ctl",
        help="supervisorctl against the running daemon, e.g. `nietest ctl status`",
        description="Run supervisorctl on etc/supervisord.conf with the daemon's environment.",
    )
    ctl.add_argument("args", nargs=argparse.REMAINDER, help="supervisorctl arguments")
    status = sub.add_parser(
        "status",
        help="processes, queue depths, dead letters, broker and store in use",
        description="Each supervised process (state, pid, uptime), each queue's ready, in-progress, "
        "delayed and dead-letter counts, and the broker and store in use.",
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_module.load()
        if args.command == "worker":
            settings.queue(args.queue)
    except SettingsError as exc:
        print(f"nietest: configuration error: {exc}", file=sys.stderr)
        return 2

    if args.command == "daemon":
        from nietest_daemon import daemon

        return daemon.run(settings)
    if args.command == "ctl":
        from nietest_daemon import daemon

        return daemon.ctl(settings, args.args)
    if args.command == "worker":
        from nietest_daemon import worker

        return worker.run(settings, args.queue)
    if args.command == "broker":
        from nietest_daemon import embedded_broker

        return embedded_broker.run(settings)
    if args.command == "status":
        from nietest_daemon import status

        return status.run(settings, as_json=args.json)
    raise AssertionError(args.command)

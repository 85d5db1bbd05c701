"""Entry point of the `nietest` console script and of `python -m nietest_daemon`."""

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Processes run under supervisord (worker, broker, metrics) log JSON from their first line, so that
    # even an import error below lands in their log file as JSON.
    helping = bool({"-h", "--help"} & set(args))  # help goes to the terminal as text
    if args[:1] in (["worker"], ["broker"], ["metrics"]) and not helping:
        from nietest_daemon.core import logs

        name = f"worker-{args[1] if len(args) > 1 else '?'}" if args[0] == "worker" else args[0]
        logs.configure(name)
    elif args[:1] in (["alerts"], ["watchdog"]) and not helping:
        # The event listeners: their stdout is supervisor's event protocol, so their JSON log
        # (and any stray print, through the captured sys.stdout) goes to stderr.
        from nietest_daemon.core import logs

        logs.configure(args[0], stream=sys.__stderr__)
    elif args[:1] == ["daemon"] and not helping:
        # Its start line is JSON already; what it logs before it execs supervisord (the store's
        # warnings) is too. Its prints stay as they are (its one-line errors go to stderr).
        from nietest_daemon.core import logs

        logs.configure("daemon", capture_std=False)
    from nietest_daemon.programs.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""supervisord, as `nietest daemon` runs it: supervisor's own main with three small changes.

`nietest daemon` execs `python -m nietest_daemon.programs.supervisord -n -c etc/supervisord.conf`.

1. JSON logs: the lines of supervisord's main log (supervisord.log and, in the foreground,
   stdout: the journal under systemd) are rendered with the same keys as the workers'
   (`timestamp`, `level`, `event`, `logger`, `pid`, `process`). The captured output of the
   children is not touched: it is already JSON.
2. Prompt respawn: supervisord's main loop polls with a 1 s timeout and SIGCHLD does not
   interrupt it, so a killed worker is noticed up to 1 s late and respawned only on the
   pass after that: 1-2 s of lost capacity per crash. A wakeup pipe (signal.set_wakeup_fd)
   ends the poll as soon as a signal arrives, and the pass after it does not wait, so the
   replacement is spawned within milliseconds. Idle, the loop still wakes once a second.
3. systemd: with NOTIFY_SOCKET set (the unit's Type=notify), READY=1 once every process is
   RUNNING, STATUS= lines with the counts, and WATCHDOG=1 pings from the main loop (WatchdogSec).
"""

from __future__ import annotations

import sys

from supervisor.supervisord import main as supervisord_main

from nietest_daemon.internals.supervisor import install_json_log, install_prompt_respawn, install_systemd_notify


def main() -> None:
    install_json_log()
    install_prompt_respawn()
    install_systemd_notify()
    sys.argv[0] = "supervisord"
    supervisord_main()


if __name__ == "__main__":
    main()

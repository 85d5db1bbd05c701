"""`nietest alerts`: the supervisor event listener that sends operations alerts to Feishu.

supervisord runs it as `[eventlistener:alerts]` (etc/supervisord.conf) and sends it every
PROCESS_STATE event and a TICK_5. What it sends, to FEISHU_ALERT_WEBHOOK_URL (falling back to
FEISHU_WEBHOOK_URL; with neither, alerts are only logged):

- **worker unresponsive** (warning): the watchdog listener killed a worker that gave no sign of
  life for NIETEST_HANG_SECONDS (programs/watchdog.py); it replaces that kill's restart alert when
  both wait in their windows.
- **worker recycled** (warning): a worker exited on its own past NIETEST_<Q>_MAX_MEMORY or
  _MAX_MESSAGES (it marked its exit as a recycle on the broker before leaving,
  coordination/counters.py) for the second time within NIETEST_ALERT_CRASH_LOOP_WINDOW; a
  single recycle is only logged, and is never counted as a crash.
- **restart** (warning): a process exited when nobody asked it to (EXITED, "not expected") and
  supervisord restarted it: queue, process, exit status (from supervisord's own `exited:` log
  line, e.g. "terminated by SIGKILL"), how long it had run, and its state now.
- **crash loop** (critical): NIETEST_ALERT_CRASH_LOOP_RESTARTS unexpected exits of one process
  (exits during start, BACKOFF, included) within NIETEST_ALERT_CRASH_LOOP_WINDOW seconds. One
  alert; its further restarts are not alerted until it has run for a whole window without
  exiting, which sends a recovery notice.
- **FATAL** (critical): supervisord gave up on a process; with the last lines of its log (the
  `event` texts of its JSON lines; secrets are redacted in the files already and again here).
  A FATAL alert replaces a crash-loop or restart alert of the same process still waiting in
  its window. A recovery notice follows if the process later runs steadily again.
- **run of failures** (critical) / **queue recovered** (success): from the pipeline's streak
  events (coordination/streaks.py), drained from the broker every second: the count and the
  most frequent error texts; then the first success after the run.
- **broker unreachable** (critical) / **broker reachable again** (success): the broker did not
  answer a PING for BROKER_GRACE_SECONDS. Workers wait for it with backoff (RUNNING, not
  crash-looping), so this is the one report of "workers cannot start or consume".
- **broker failover** (warning): with a `redis+sentinel://` BROKER_REDIS_URL, the Sentinels named a
  new primary (the old and new addresses, the master name, the config epoch). Every daemon on the
  broker sees it; the one whose listener recorded the change on the broker first sends it (failover.py).
- **host lost** (critical) / **host back** (success): another daemon on the broker gave no sign of
  life for NIETEST_HOST_LOST_SECONDS and one surviving daemon handed back its work (how long it was
  silent, who took over, how many messages and subtasks); then the host beats again, its workers
  restarted (programs/host_keeper.py). Whichever daemon's listener drains the event sends it.
- **listener restarted** (warning): the previous listener ended without a clean stop (it was
  killed or crashed, or the whole daemon was): a marker file in the run dir says so at start.

Every kind is coalesced (engine.py); the card title carries the host name and, when all items
share one, the queue; the colour follows the severity (kinds.py).

The modules: `kinds` (AlertKind: severity, title, send order), `inputs` (what the engine is
told), `records` (what it keeps), `engine` (the rules and the coalescing), `render` (the text),
`supervisor_log` (supervisord's log and the marker file), `failover` (the Sentinels' primary watched),
`listener` (the process and its threads).
"""

from nietest_daemon.programs.alerts.listener import run

__all__ = ["run"]

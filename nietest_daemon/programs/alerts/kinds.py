"""The kinds of operations alert: each one's severity, card title and place in the send order.

Adding a kind: one member here, the rule that raises it (engine.py) and its text (render.py).
"""

from __future__ import annotations

from enum import StrEnum

from nietest_daemon.clients.feishu import Severity


class AlertKind(StrEnum):
    """One kind of alert; its value is the `kind` of the logs and of `nietest_alerts_total`.

    Members are declared in send order: kinds due at the same moment go out in this order
    (problems before their recoveries). `one` and `many` are the card titles for one item and
    for several, with the placeholders of `card_title`.
    """

    severity: Severity
    one: str
    many: str

    def __new__(cls, value: str, severity: Severity, one: str, many: str) -> AlertKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.severity = severity
        member.one = one
        member.many = many
        return member

    UNRESPONSIVE = "unresponsive", "warning", "Worker unresponsive: {one}", "{n} workers unresponsive"
    RECYCLE = "recycle", "warning", "Worker recycled twice within the window: {one}", "{n} workers recycling often"
    RESTART = "restart", "warning", "{Noun} restarted: {one}", "{n} {noun} restarts"
    CRASH_LOOP = "crash_loop", "critical", "Crash loop: {one}", "Crash loops: {n} processes"
    FATAL = "fatal", "critical", "FATAL: supervisord gave up on {one}", "FATAL: supervisord gave up on {n} processes"
    PROCESS_RECOVERED = (
        "process_recovered",
        "success",
        "Recovered: {one} runs steadily again",
        "Recovered: {n} processes",
    )
    FAILURE_RUN = "failure_run", "critical", "Run of failed subtasks", "Runs of failed subtasks on {subjects} queues"
    QUEUE_RECOVERED = "queue_recovered", "success", "Queue recovered: subtasks succeed again", "{n} queues recovered"
    BROKER_DOWN = "broker_down", "critical", "Broker unreachable", "Broker unreachable"
    BROKER_UP = "broker_up", "success", "Broker reachable again", "Broker reachable again"
    BROKER_FAILOVER = "broker_failover", "warning", "Broker failover: {one}", "Broker failovers: {n}"
    HOST_LOST = "host_lost", "critical", "Host lost: {one}", "{n} hosts lost"
    HOST_BACK = "host_back", "success", "Host back: {one}", "{n} hosts back"
    LISTENER_RESTART = "listener_restart", "warning", "Alerts listener restarted", "Alerts listener restarted"

    def card_title(self, subjects: list[str], *, workers: bool) -> str:
        """The card title for these subjects (in arrival order; `workers`: every one is a worker).

        Placeholders: {one} the first subject, {n} how many, {subjects} how many distinct ones,
        {noun} / {Noun} "worker" if `workers` else "process".
        """
        noun = "worker" if workers else "process"
        template = self.one if len(subjects) == 1 else self.many
        return template.format(
            one=subjects[0], n=len(subjects), subjects=len(set(subjects)), noun=noun, Noun=noun.capitalize()
        )

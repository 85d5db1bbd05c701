"""`python -m nietest_daemon.testing.fake_nieta`: the fake API as a process of its own (the
package's docstring says what it prints)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from nietest_daemon.testing.fake_nieta.rules import SHAPES
from nietest_daemon.testing.fake_nieta.server import DEFAULT_TOKEN, FakeNieta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake Nieta image API on 127.0.0.1 (tests and benchmarks).")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: any free port; the ready line tells)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the X-Token the fake accepts")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every API request waits before answering")
    parser.add_argument("--latency-jitter", type=float, default=0.0, help="a random extra latency, up to N seconds")
    parser.add_argument("--generation-time", type=float, default=0.0, help="seconds until a job is SUCCESS")
    parser.add_argument("--rule", action="append", default=[], help="a rule as a JSON object (repeatable)")
    parser.add_argument("--rules-file", help="a JSON file holding a list of rules")
    parser.add_argument("--create-shape", default="string", choices=sorted(SHAPES), help="shape of the create answer")
    parser.add_argument("--marker-regex", help="count created jobs per match of this regex (see /_fake/stats)")
    parser.add_argument("--no-record", action="store_true", help="do not keep every request in memory")
    parser.add_argument("--stats-interval", type=float, default=0.0, help="print stats to stderr every N seconds")
    args = parser.parse_args(argv)

    rules: list[Any] = [json.loads(text) for text in args.rule]
    if args.rules_file:
        with open(args.rules_file, encoding="utf-8") as fh:
            rules += json.load(fh)
    fake = FakeNieta(
        args.token,
        host=args.host,
        port=args.port,
        generation_time=args.generation_time,
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        rules=rules,
        create_shape=args.create_shape,
        record=not args.no_record,
        marker_regex=args.marker_regex,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fake.start()
    ready = {"url": fake.url, "ops_url": fake.ops_url, "token": fake.token, "pid": os.getpid()}
    print(json.dumps(ready), flush=True)
    interval = args.stats_interval if args.stats_interval > 0 else None
    while not stop.wait(interval):
        print(json.dumps(fake.stats()), file=sys.stderr, flush=True)
    fake.stop()
    print(json.dumps(fake.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

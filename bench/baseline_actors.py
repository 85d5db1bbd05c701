"""Actors for bench/pipeline.py, loaded by the workers through NIETEST_ACTOR_MODULES.

- `baseline_subtask`: a subtask written the way the replaced system did it: create the job,
  then hold the worker thread in a sleep-and-poll loop until the job ends.
- `noop`: the cheapest message there is (one Redis INCR), for the overhead comparison.
"""

import os
import time

import dramatiq
import httpx

from nietest_daemon.core.settings import QUEUE_NAME_VARS

_var, _default = QUEUE_NAME_VARS["subtask"]
_QUEUE = os.environ.get(_var) or _default
_client = httpx.Client(
    base_url=os.environ.get("NIETA_API_BASE_URL", ""),
    headers={"X-Token": os.environ.get("NIETA_XTOKEN", ""), "x-platform": "nieta-app/web"},
    timeout=30,
)


@dramatiq.actor(actor_name="baseline_subtask", queue_name=_QUEUE, max_retries=0, time_limit=600_000)
def baseline_subtask(index: int, interval: float) -> None:
    body = {
        "storyId": "",
        "jobType": "universal",
        "width": 1024,
        "height": 1024,
        "seed": index + 1,
        "rawPrompt": [{"type": "freetext", "value": f"baseline {index}", "weight": 1.0}],
        "meta": {"entrance": "PICTURE,PURE"},
        "advanced_translator": False,
    }
    job = _client.post("/v3/make_image", json=body).json()
    while True:
        time.sleep(interval)  # the thread is held for the whole generation
        if _client.get(f"/v1/artifact/task/{job}").json().get("task_status") == "SUCCESS":
            break
    dramatiq.get_broker().client.incr("bench:baseline_done")


@dramatiq.actor(actor_name="bench_noop", queue_name=_QUEUE, max_retries=0)
def bench_noop() -> None:
    dramatiq.get_broker().client.incr("bench:noop_done")

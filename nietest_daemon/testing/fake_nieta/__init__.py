r"""A fake Nieta image API: a real HTTP server on 127.0.0.1, for tests and benchmarks.

In a test::

    from nietest_daemon.testing.fake_nieta import FakeNieta, Rule

    with FakeNieta(generation_time=0.2) as api:
        api.add_rule("failure", marker="st-7", error="GPU on fire")   # jobs whose prompts contain st-7 fail
        api.add_rule("http_500", endpoint="create", times=2)          # the next two creates answer 500
        client = NietaClient(api.token, api.url, api.ops_url)
        ...
        assert api.created_count("st-7") == 1
        print(api.stats())

The standard host is `api.url`, the Lumina host `api.ops_url` (the same server under `/ops`; jobs
belong to the host that created them). As a separate process, for benchmarks::

    python -m nietest_daemon.testing.fake_nieta --port 8089 --latency 0.05 --latency-jitter 0.2 --generation-time 2.0 \
        --rule '{"action": "failure", "marker": "x"}'

prints one JSON line `{"url": ..., "ops_url": ..., "token": ..., "pid": ...}` when it is ready,
serves until SIGTERM / SIGINT, then prints its stats as one JSON line. Control endpoints (not
authenticated, not counted): `GET /_fake/stats`, `GET /_fake/created_counts?pattern=REGEX`,
`POST /_fake/rules` (a rule object or a list), `POST /_fake/reset`, `POST /_fake/config`
(`{"latency": s, "generation_time": s}`).

Rules (`Rule`, first matching one wins, separately for "response" and "outcome" actions):

- selection: `endpoint` ("create", "poll", "any"), `nth` (1-based index of the request on that
  endpoint, counting every authenticated request), `marker` (substring of the job's prompts),
  `lumina` (True: ops host only, False: standard only), `times` (how often it applies; None = always),
  `probability` (applies to that share of the requests it selects, drawn at random).
- outcomes of a created job (create rules): `failure` (`error`, put in `error_field`),
  `illegal_image`, `timeout`, `no_url` (SUCCESS without an artifact url), `status` (any
  `task_status`), `never` (stays PENDING), `slow` (success after `generation_time`); any
  outcome rule may set `generation_time`.
- answers (any endpoint): `http_500` (or `status`), `http_429` (`retry_after`), `http` (`status`,
  `body`), `drop` (close the connection without an answer), `html` (an HTML error page, 502),
  `empty` (200, empty body), `huge` (200, `size` bytes), `wrong_type` (200, a JSON list or `body`),
  `raw` (`status`, `body` sent as is, `content_type`), `unknown_job` (poll: 404 task not found),
  `shape` (create: the uuid in another `shape`: string, bare, uuid, task_uuid, id, task_id,
  data, data.uuid, data.task_uuid, data.id, data.task_id), `delay` (answer normally after `delay`).
  Every rule may set `delay`: seconds to wait before its answer (a client read timeout).

The modules: `rules` (the script: `Rule` and its actions), `answers` (what a scripted answer, a
create and a poll send), `server` (`FakeNieta`, its HTTP server and control endpoints) and
`__main__` (the standalone process).
"""

from nietest_daemon.testing.fake_nieta.answers import HTML_ERROR_PAGE, PNG_1X1, Job
from nietest_daemon.testing.fake_nieta.rules import OUTCOME_ACTIONS, RESPONSE_ACTIONS, SHAPES, Rule
from nietest_daemon.testing.fake_nieta.server import (
    CREATE_PATH,
    DEFAULT_TOKEN,
    MAX_REQUEST_BYTES,
    OPS_PREFIX,
    POLL_PREFIX,
    FakeNieta,
    Recorded,
)

__all__ = [
    "CREATE_PATH",
    "DEFAULT_TOKEN",
    "HTML_ERROR_PAGE",
    "MAX_REQUEST_BYTES",
    "OPS_PREFIX",
    "OUTCOME_ACTIONS",
    "PNG_1X1",
    "POLL_PREFIX",
    "RESPONSE_ACTIONS",
    "SHAPES",
    "FakeNieta",
    "Job",
    "Recorded",
    "Rule",
]

"""`Outage`: the errors that say a service nietest needs could not be reached, not that the work is wrong.

A message whose actor failed on one is run again later rather than failed
(`coordination.connection.unreachable_service`, the one outage predicate of the pipeline). The
broker's outages are redis-py's own errors; every other service's subclasses `Outage` (the task
store's `store.base.StoreUnavailable`), so that the predicate needs no import of the layers above.
"""

from __future__ import annotations


class Outage(Exception):
    """A service could not be reached, or did not answer in time: try the work again later."""

    #: What could not be reached, as log lines name it ("store").
    service: str = "service"

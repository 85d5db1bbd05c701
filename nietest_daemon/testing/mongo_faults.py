"""A MongoDB server's behaviour around mongomock, for the store's tests and benches.

mongomock runs each operation in Python: it is not atomic per operation, never fails, and its
`bulk_write` cannot take pymongo's `UpdateOne` any more. `FaultyDatabase` wraps a mongomock
database (`FaultyClient` a client) so that the Mongo store meets what a server does, and what
can go wrong with one:

- every collection call runs under one lock, as each single-document operation is atomic on a
  server, and nothing more (a cursor is read whole, under the lock, when first iterated);
- every call is recorded (`calls`: collection, method, filter, sort, update): one call is one
  round trip; every query, those inside a bulk write too, also in `queries`: their filters and
  sorts say which index each needs;
- armed faults (`fail`) make a matching call raise, before it is applied (the server never got
  it) or after (applied, the reply lost: a failover);
- `Turns` makes the calls of several threads happen one at a time in a chosen order, so a test
  can run every interleaving of two operations;
- `deny_index_builds` makes `create_index(es)` fail as for a user without the privilege;
- `bulk_write` runs its requests one by one, as a server runs an unordered bulk write (each
  write atomic, the batch not), and counts as one round trip;
- an inserted document over MongoDB's 16 MiB (`MAX_BSON_BYTES`, as BSON) is refused with
  pymongo's `DocumentTooLarge`, before anything is sent, as pymongo refuses it;
- `command("hello")` answers as a replica set's primary does (`hello`: `STANDALONE_HELLO` makes the
  server standalone); other commands go to mongomock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
from pymongo.errors import DocumentTooLarge, OperationFailure
from pymongo.operations import UpdateMany, UpdateOne

Sort = tuple[tuple[str, int], ...]

#: MongoDB's largest document, as BSON (`maxBsonObjectSize`).
MAX_BSON_BYTES = 16 * 1024 * 1024
#: `hello` as a replica set's primary answers it (the part the store reads), and as a standalone server does.
REPLICA_SET_HELLO: dict[str, Any] = {
    "isWritablePrimary": True,
    "setName": "rs0",
    "maxBsonObjectSize": MAX_BSON_BYTES,
    "ok": 1.0,
}
STANDALONE_HELLO: dict[str, Any] = {"isWritablePrimary": True, "maxBsonObjectSize": MAX_BSON_BYTES, "ok": 1.0}


def check_bson_size(document: Mapping[str, Any]) -> None:
    """Raise `DocumentTooLarge` as pymongo does for a document over `MAX_BSON_BYTES`."""
    size = len(bson.encode(document))
    if size > MAX_BSON_BYTES:
        raise DocumentTooLarge(
            f"BSON document too large ({size} bytes) - the connected server supports BSON document sizes"
            f" up to {MAX_BSON_BYTES} bytes."
        )


@dataclass(frozen=True)
class Call:
    """One collection call: a round trip to the server."""

    collection: str
    method: str
    filter: Mapping[str, Any] | None = None
    sort: Sort = ()
    update: Any = None

    @property
    def is_query(self) -> bool:
        """It selects documents by a filter (and so needs an index to do it well)."""
        return self.filter is not None


@dataclass
class Fault:
    when: Callable[[Call], bool]
    error: BaseException
    times: int | None  # None: every matching call
    applied: bool  # raise after the call was applied (its reply lost) rather than before


def _sort_of(key_or_list: Any, direction: Any = None) -> Sort:
    if key_or_list is None:
        return ()
    if isinstance(key_or_list, str):
        return ((key_or_list, 1 if direction is None else int(direction)),)
    if isinstance(key_or_list, Mapping):
        key_or_list = list(key_or_list.items())
    return tuple((str(k), int(d)) for k, d in key_or_list)


def _aggregate_call(collection: str, pipeline: Sequence[Mapping[str, Any]]) -> Call:
    match: Mapping[str, Any] = {}
    sort: Sort = ()
    for stage in pipeline:
        if "$match" in stage and not match:
            match = stage["$match"]
        elif "$sort" in stage and not sort:
            sort = _sort_of(stage["$sort"])
    return Call(collection, "aggregate", match, sort)


def describe(collection: str, method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Call:
    """The call `collection.method(*args, **kwargs)` as a `Call` record."""

    def arg(index: int, name: str) -> Any:
        return args[index] if len(args) > index else kwargs.get(name)

    if method in ("find", "find_one", "count_documents", "delete_one", "delete_many", "distinct"):
        position = 1 if method == "distinct" else 0
        found = arg(position, "filter")
        filter_ = dict(found) if isinstance(found, Mapping) else ({} if found is None else {"_id": found})
        return Call(collection, method, filter_, _sort_of(kwargs.get("sort")))
    if method in ("update_one", "update_many", "find_one_and_update", "replace_one", "find_one_and_replace"):
        return Call(collection, method, dict(arg(0, "filter") or {}), _sort_of(kwargs.get("sort")), arg(1, "update"))
    if method == "aggregate":
        return _aggregate_call(collection, arg(0, "pipeline") or [])
    return Call(collection, method)


@dataclass
class _BulkResult:
    """What callers read of a `BulkWriteResult`."""

    matched_count: int = 0
    modified_count: int = 0
    acknowledged: bool = True


class Turns:
    """Lets the calls of named threads happen one at a time, in the order `order` names them.

    `run(name=callable, ...)` runs each callable in its own thread; every collection call of one
    of them waits until the head of `order` names its thread, and its end moves the order on. The
    turns of a thread that has returned are skipped; once the order runs out, calls go freely.
    """

    def __init__(self, order: Iterable[str], *, timeout: float = 10.0) -> None:
        self._order: deque[str] = deque(order)
        self._done: set[str] = set()
        self._cond = threading.Condition()
        self._local = threading.local()
        self._timeout = timeout

    def _settle(self) -> None:
        while self._order and self._order[0] in self._done:
            self._order.popleft()

    def enter(self) -> None:
        name: str | None = getattr(self._local, "name", None)
        if name is None:
            return
        with self._cond:
            self._settle()
            if not self._cond.wait_for(lambda: not self._order or self._order[0] == name, self._timeout):
                raise AssertionError(f"{name}'s turn never came (order left: {list(self._order)})")

    def leave(self) -> None:
        name: str | None = getattr(self._local, "name", None)
        if name is None:
            return
        with self._cond:
            if self._order and self._order[0] == name:
                self._order.popleft()
            self._settle()
            self._cond.notify_all()

    def run(self, **work: Callable[[], Any]) -> dict[str, Any]:
        """Run each callable in a thread of its name, under the order; their results (the first
        exception raised, if any, is raised here once all have returned)."""
        results: dict[str, Any] = {}
        errors: list[BaseException] = []

        def body(name: str, fn: Callable[[], Any]) -> None:
            self._local.name = name
            try:
                results[name] = fn()
            except BaseException as exc:
                errors.append(exc)
            finally:
                with self._cond:
                    self._done.add(name)
                    self._settle()
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(name, fn), name=name) for name, fn in work.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self._timeout * 10)
        if errors:
            raise errors[0]
        return results


def interleavings(**counts: int) -> Iterator[tuple[str, ...]]:
    """Every order of `counts[name]` turns of each name (the distinct permutations), e.g.
    `interleavings(retry=2, finish=1)`: (retry, retry, finish), (retry, finish, retry), ..."""
    if not any(counts.values()):
        yield ()
        return
    for name, left in counts.items():
        if left:
            for rest in interleavings(**{**counts, name: left - 1}):
                yield (name, *rest)


class FaultyCollection:
    """A mongomock collection behind the database's lock, faults, record and turns."""

    def __init__(self, collection: Any, db: FaultyDatabase) -> None:
        self._collection = collection
        self._db = db

    @property
    def name(self) -> str:
        return str(self._collection.name)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._collection, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            record = describe(self.name, name, args, kwargs)
            return self._db.perform(record, lambda: attr(*args, **kwargs))

        return call

    def find(self, *args: Any, **kwargs: Any) -> _Cursor:
        return _Cursor(self, args, kwargs)

    def insert_one(self, document: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        check_bson_size(document)
        return self.__getattr__("insert_one")(document, *args, **kwargs)

    def insert_many(self, documents: Iterable[Mapping[str, Any]], *args: Any, **kwargs: Any) -> Any:
        documents = list(documents)
        for document in documents:
            check_bson_size(document)
        return self.__getattr__("insert_many")(documents, *args, **kwargs)

    def bulk_write(self, requests: Sequence[Any], ordered: bool = True, **kwargs: Any) -> _BulkResult:
        def run() -> _BulkResult:
            result = _BulkResult()
            for request in requests:
                if not isinstance(request, UpdateOne | UpdateMany):
                    raise NotImplementedError(f"bulk_write of {type(request).__name__} in mongo_faults")
                method = self._collection.update_one if isinstance(request, UpdateOne) else self._collection.update_many
                done = method(request._filter, request._doc)
                result.matched_count += done.matched_count
                result.modified_count += done.modified_count
            return result

        for request in requests:  # each a query; one round trip in all
            self._db.record_query(Call(self.name, "bulk_write.update", dict(request._filter), (), request._doc))
        return self._db.perform(Call(self.name, "bulk_write"), run)


class _Cursor:
    """A `find` cursor: `sort` and `limit` recorded, the documents read whole, under the lock, on first use."""

    def __init__(self, collection: FaultyCollection, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._collection = collection
        self._args = args
        self._kwargs = kwargs
        self._sort: Sort = _sort_of(kwargs.get("sort"))
        self._limit = int(kwargs.get("limit") or 0)
        self._docs: Iterator[Any] | None = None

    def sort(self, key_or_list: Any, direction: Any = None) -> _Cursor:
        self._sort = _sort_of(key_or_list, direction)
        return self

    def limit(self, limit: int) -> _Cursor:
        self._limit = int(limit)
        return self

    def _fetch(self) -> Iterator[Any]:
        if self._docs is None:
            record = describe(self._collection.name, "find", self._args, self._kwargs)
            record = Call(record.collection, "find", record.filter, self._sort)
            kwargs = {k: v for k, v in self._kwargs.items() if k not in ("sort", "limit")}

            def run() -> list[Any]:
                cursor = self._collection._collection.find(*self._args, **kwargs)
                if self._sort:
                    cursor = cursor.sort(list(self._sort))
                if self._limit:
                    cursor = cursor.limit(self._limit)
                return list(cursor)

            self._docs = iter(self._collection._db.perform(record, run))
        return self._docs

    def __iter__(self) -> Iterator[Any]:
        return self._fetch()

    def __next__(self) -> Any:
        return next(self._fetch())


@dataclass
class FaultyDatabase:
    """A mongomock database whose collections behave as on a server (see the module's docstring)."""

    db: Any
    calls: list[Call] = field(default_factory=list)
    queries: list[Call] = field(default_factory=list)
    turns: Turns | None = None
    hello: dict[str, Any] = field(default_factory=lambda: dict(REPLICA_SET_HELLO))
    _faults: list[Fault] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __getitem__(self, name: str) -> FaultyCollection:
        return FaultyCollection(self.db[name], self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def command(self, command: str | Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """A database command, one round trip: `hello` answers `self.hello`, others go to mongomock."""
        name = command if isinstance(command, str) else next(iter(command))
        if name in ("hello", "isMaster", "ismaster"):
            return self.perform(Call("$cmd", name), lambda: dict(self.hello))
        return self.perform(Call("$cmd", str(name)), lambda: self.db.command(command, *args, **kwargs))

    # --- faults ----------------------------------------------------------------------------------

    def fail(
        self,
        when: Callable[[Call], bool],
        error: BaseException,
        *,
        times: int | None = 1,
        applied: bool = False,
    ) -> Fault:
        """Make the next `times` calls that `when` matches raise `error` (None: all of them):
        before they are applied, or after (`applied`: the write happened, its reply was lost)."""
        fault = Fault(when, error, times, applied)
        with self._lock:
            self._faults.append(fault)
        return fault

    def deny_index_builds(self) -> None:
        """`create_index` / `create_indexes` fail as for a user without the privilege."""
        self.fail(
            lambda call: call.method in ("create_index", "create_indexes"),
            OperationFailure("not authorized on task_db to execute command { createIndexes: ... }", code=13),
            times=None,
        )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _fault_for(self, call: Call) -> Fault | None:
        for fault in self._faults:
            if (fault.times is None or fault.times > 0) and fault.when(call):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    # --- calls -----------------------------------------------------------------------------------

    def record_query(self, call: Call) -> None:
        with self._lock:
            self.queries.append(call)

    def perform(self, call: Call, run: Callable[[], Any]) -> Any:
        """Run one collection call: in its turn, under the lock, recorded, with its fault if armed."""
        turns = self.turns
        if turns is not None:
            turns.enter()
        try:
            with self._lock:
                self.calls.append(call)
                if call.is_query:
                    self.queries.append(call)
                fault = self._fault_for(call)
                if fault is not None and not fault.applied:
                    raise fault.error
                result = run()
                if fault is not None:
                    raise fault.error
                return result
        finally:
            if turns is not None:
                turns.leave()

    def count(self, since: int = 0) -> int:
        """Round trips since the `since`-th call (`len(calls)` before an operation)."""
        return len(self.calls) - since


class FaultyClient:
    """A mongomock client handing out `FaultyDatabase`s (one per name, so faults armed on one stay)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._dbs: dict[str, FaultyDatabase] = {}

    def __getitem__(self, name: str) -> FaultyDatabase:
        if name not in self._dbs:
            self._dbs[name] = FaultyDatabase(self.client[name])
        return self._dbs[name]

    def get_database(self, name: str, *args: Any, **kwargs: Any) -> FaultyDatabase:
        return self[name]

    def close(self) -> None:
        """Closing a handle leaves the data: other handles of the test still read it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

"""`mpqueue.Pool`: the API of `multiprocessing.pool.Pool`, with the jobs on an mpqueue cluster.

::

    apply_async / map_async / imap ...  (the caller's thread: a _Feed, and a result object)
         │
         ▼
    feeder thread ── a chunk of a feed's input at a time ──▶ Client.submit(_Call, chunk)
                                                                 │ (the cluster)
    AsyncResult / MapResult / IMapIterator ◀── _Dispatcher._chunk_done ◀── Future done
                                               (the client's collect thread)

Each call becomes a `_Feed`: its input, the `_Call` its jobs run, and the
object that gathers its results. One feeder thread reads the inputs, in the
order the calls came, like the task handler thread of `multiprocessing.pool`,
so that no call blocks; it sends a burst of ``apply_async`` calls in
batches. A feed has a window: the most chunks it may have out
at once. For ``imap``, a chunk stays out until the consumer takes its results,
so an endless input is read only as far ahead as the window. With an address,
``processes`` bounds the jobs this pool has on the cluster at once.

In a worker's process, a `_Call` runs the pool's initializer once (see
`_Call._initialize`), then the function over the chunk's items, and returns
the results with the seconds the function took, from which a feed with no
``chunksize`` sizes its next chunks (`_Chunker`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.pool
import operator
import os
import pickle
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

from .client import Client
from .cluster import LocalCluster, cluster_procs, usable_cpus
from .config import format_address, resolve_authkey
from .errors import MpqueueError, RemoteTraceback
from .protocol import Wrapper

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator"]

log = logging.getLogger("mpqueue.pool")

#: With no ``chunksize``, a job carries about this much work, in seconds, as
#: the worker measures it. Measured on 2 cores (docs/migrating.md#chunksize):
#: 0.01 and 0.02 s lose up to 40% to the client's and broker's own work on tiny
#: items; 0.2 s (joblib's aim) leaves processes idle at the end of short
#: inputs; 0.05 to 0.1 s do well on both.
TARGET_CHUNK_SECONDS = 0.1

#: With no ``chunksize``, this many jobs per process are out at once: chunks
#: are sized to keep a process busy, so two each cover the round trip.
AUTO_WINDOW_PER_PROC = 2

#: With a given ``chunksize``, the work per job is unknown; keep this many
#: jobs out (the window of `Client.map`), so tiny jobs still stream.
FIXED_WINDOW = 1024

#: An input of unknown length (imap) is cut into chunks of at most this many
#: items: past it, a job's overhead no longer shows, and what is read ahead
#: stays modest.
MAX_AUTO_CHUNK = 10_000

#: The feeder sends up to this many calls down to their last chunk (as every
#: ``apply_async`` is) in one pass (`_Dispatcher._next_feeds`), taking its
#: lock three times for all of them: it spends 3 to 5 us less on each than
#: one call a pass would (2 cores), and a burst no longer wakes it for each.
FEED_BATCH = 64

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
APPLY, MAP, STARMAP = "apply", "map", "starmap"

#: In a worker's process: the pools whose importable initializer ran here.
_initialized: set[str] = set()


class _Call(Wrapper):
    """What a pool's job runs in a worker's process: the pool's initializer,
    once, then ``fn`` over a chunk of items. Returns the results and the
    seconds ``fn`` took."""

    def __init__(self, fn: Callable, kind: str, pool_id: str,
                 initializer: Callable | None, initargs: tuple):
        self.fn = fn
        self.kind = kind
        self.pool_id = pool_id
        self.initializer = initializer
        self.initargs = initargs

    def __call__(self, items: list) -> tuple[list, float]:
        if self.initializer is not None:
            self._initialize(self.initializer)
        fn = self.fn
        start = time.perf_counter()
        if self.kind == MAP:
            results = list(map(fn, items))
        elif self.kind == STARMAP:
            results = list(itertools.starmap(fn, items))     # as the stdlib's pool does
        else:
            results = [fn(*args, **kwds) for args, kwds in items]
        return results, time.perf_counter() - start

    def _initialize(self, init: Callable) -> None:
        """Run the initializer once per process, before this pool's first job there.

        An importable initializer shares its module with everything in the
        process: once per process, as in `multiprocessing.Pool`. One sent by
        value (from ``__main__``, a lambda, a module registered with
        ``cloudpickle.register_pickle_by_value``) arrives with a private copy
        of its module's globals, shared only with the function it was sent
        with: it runs once per such copy, so that a global it sets is there
        for every function that reads it. If it raises, the job fails with
        that exception, and the next job tries again.
        """
        namespace = getattr(init, "__globals__", None)
        module = sys.modules.get(getattr(init, "__module__", None) or "")
        if namespace is None or (module is not None and vars(module) is namespace):
            if self.pool_id not in _initialized:
                init(*self.initargs)
                _initialized.add(self.pool_id)
        else:
            marker = f"__mpqueue_pool_{self.pool_id}_initialized__"
            if marker not in namespace:
                init(*self.initargs)
                namespace[marker] = True


class _Chunker:
    """Chunk sizes for one feed: ``chunksize`` if given; else aiming at
    `TARGET_CHUNK_SECONDS` of work per job, by the time per item the jobs
    measure, and one item per job until the first measurement arrives."""

    def __init__(self, chunksize: int | None, cap: int):
        self.fixed = chunksize
        self.cap = cap
        self.per_item: float | None = None

    def size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.per_item is None:
            return 1
        return max(1, min(self.cap, int(TARGET_CHUNK_SECONDS / max(self.per_item, 1e-9))))

    def observe(self, items: int, seconds: float) -> None:
        """Called from the client's collect thread; a float's update is atomic enough."""
        if self.fixed is None and items:
            per_item = seconds / items
            self.per_item = per_item if self.per_item is None else (self.per_item + per_item) / 2


#: An apply_async's chunker: one chunk of its one item. It learns nothing
#: (`_Chunker.observe`), so every call shares it.
_ONE_ITEM = _Chunker(1, 1)


def _with_stdlib_cause(exc: BaseException) -> BaseException:
    """Chain the remote traceback as `multiprocessing.pool.RemoteTraceback`,
    as the standard library's pool does."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        exc.__cause__ = multiprocessing.pool.RemoteTraceback(cause.tb)  # type: ignore[attr-defined]  # not in typeshed
    return exc


# -- results --------------------------------------------------------------------

class AsyncResult:
    """The result of `Pool.apply_async`, as `multiprocessing.pool.AsyncResult`.

    ``callback`` or ``error_callback`` is called with the value or the
    exception, in the thread that delivers results, before `ready` turns
    True: it should return quickly. One that raises is logged.
    """

    def __init__(self, callback: Callable | None, error_callback: Callable | None):
        # Held until the result is set; a waiter acquires it and hands it on.
        # A lock costs 0.3 us to make and release, a threading.Event 6 us:
        # much of the time of an apply_async call.
        self._unready = threading.Lock()
        self._unready.acquire()
        self._ready = False
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._ready

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if self._ready:
            return
        if timeout is None:
            got = self._unready.acquire()
        elif timeout > 0:
            got = self._unready.acquire(True, timeout)
        else:
            got = self._unready.acquire(False)
        if got:
            self._unready.release()

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, success: bool, value: Any) -> None:
        self._success, self._value = success, value
        callback = self._callback if success else self._error_callback
        if callback is not None:
            try:
                callback(value)
            except Exception:
                log.exception("exception calling callback for %r", self)
        if not self._ready:
            self._ready = True
            self._unready.release()

    # As a feed's sink: one chunk of one item.
    def _chunk_done(self, index: int, start: int, ok: bool, value: Any) -> None:
        self._set(ok, value[0] if ok else value)

    def _input_done(self, chunks: int, error: BaseException | None) -> None:
        if error is not None and not self.ready():
            self._set(False, error)


ApplyResult = AsyncResult


class MapResult(AsyncResult):
    """The result of `Pool.map_async`: ready once every chunk has finished; a
    failure is the first exception to arrive, as in `multiprocessing.pool`."""

    def __init__(self, callback: Callable | None, error_callback: Callable | None):
        super().__init__(callback, error_callback)
        self._lock = threading.Lock()
        self._chunks: dict[int, list] = {}
        self._error: BaseException | None = None
        self._arrived = 0
        self._total: int | None = None
        self._finished = False

    def _chunk_done(self, index: int, start: int, ok: bool, value: Any) -> None:
        with self._lock:
            self._arrived += 1
            if ok:
                self._chunks[start] = value
            elif self._error is None:
                self._error = value
        self._maybe_finish()

    def _input_done(self, chunks: int, error: BaseException | None) -> None:
        with self._lock:
            self._total = chunks
            if error is not None and self._error is None:
                self._error = error
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        with self._lock:
            if self._total is None or self._arrived < self._total or self._finished:
                return
            self._finished = True
            chunks, self._chunks = self._chunks, {}
            error = self._error
        if error is not None:
            self._set(False, error)
        else:
            self._set(True, list(itertools.chain.from_iterable(chunks[start] for start in sorted(chunks))))


class IMapIterator:
    """The iterator of `Pool.imap`: results in input order, lazily.

    ``next(timeout)`` raises `multiprocessing.TimeoutError` if the next result
    is not there in time. A failed chunk raises its exception in its place,
    and the iteration goes on after it; an exception from the input is raised
    after the results of the items before it, and ends the iteration.
    """

    def __init__(self, dispatcher: "_Dispatcher"):
        self._dispatcher = dispatcher
        self._feed: _Feed | None = None
        self._cond = threading.Condition(threading.Lock())
        self._buffer: deque = deque()
        self._taken = 0                     # chunks handed to the consumer
        self._end: int | None = None        # how many chunks the input made, once it ended
        self._error: BaseException | None = None

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer:
            with self._cond:
                while not self._has_next():
                    if self._end is not None and self._taken >= self._end:
                        error, self._error = self._error, None
                        if error is not None:
                            raise error
                        raise StopIteration
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise multiprocessing.TimeoutError
                    self._cond.wait(remaining)
                ok, value = self._take()
                self._taken += 1
            if self._feed is not None:      # set as the pool takes the call, before any result
                self._dispatcher._consumed(self._feed)
            if not ok:
                raise value
            self._buffer.extend(value)
        return self._buffer.popleft()

    __next__ = next

    # The ordered variant; IMapUnorderedIterator overrides these three.
    def _init_slots(self) -> None:
        self._chunks: dict[int, tuple[bool, Any]] = {}

    def _has_next(self) -> bool:
        return self._taken in self._chunks

    def _take(self) -> tuple[bool, Any]:
        return self._chunks.pop(self._taken)

    def _put(self, index: int, item: tuple[bool, Any]) -> None:
        self._chunks[index] = item

    # As a feed's sink.
    def _chunk_done(self, index: int, start: int, ok: bool, value: Any) -> None:
        with self._cond:
            self._put(index, (ok, value))
            self._cond.notify_all()

    def _input_done(self, chunks: int, error: BaseException | None) -> None:
        with self._cond:
            self._end, self._error = chunks, error
            self._cond.notify_all()


_Iterator = TypeVar("_Iterator", bound=IMapIterator)


class IMapUnorderedIterator(IMapIterator):
    """The iterator of `Pool.imap_unordered`: results as their chunks finish."""

    def _init_slots(self) -> None:
        self._ready: deque = deque()

    def _has_next(self) -> bool:
        return bool(self._ready)

    def _take(self) -> tuple[bool, Any]:
        return self._ready.popleft()

    def _put(self, index: int, item: tuple[bool, Any]) -> None:
        self._ready.append(item)


# -- the dispatcher ---------------------------------------------------------------

#: Iterators whose ``__length_hint__`` is exact: the items left, even if the
#: list grew or shrank since.
_SIZED_ITERATORS = frozenset({type(iter([])), type(iter(())), type(iter(range(0))), type(iter(range(2 ** 64)))})


class _Feed:
    """One call's input, cut into chunks, and where its results go.

    Its counters are guarded by the dispatcher's condition; only the feeder
    thread reads ``items``.
    """

    def __init__(self, call: _Call, items: Iterator, chunker: _Chunker, window: int | None,
                 sink, on_drop: Callable | None = None):
        self.call = call
        self.items = items
        self.chunker = chunker
        self.window = window
        # imap: a chunk is out until its results are taken, and the iterator is
        # held weakly: once the caller drops it, ``on_drop`` wakes the feeder,
        # which stops reading the input and withdraws the chunks out.
        self.lazy = on_drop is not None
        self._sink: Any = sink
        if on_drop is not None:
            drop = on_drop
            self._sink = weakref.ref(sink, lambda _: drop())
        self.chunks = 0             # cut so far: the index of the next one
        self.position = 0           # items read so far
        self.done = 0               # chunks whose jobs finished
        self.consumed = 0           # chunks the imap consumer has taken
        self.exhausted = False      # the input ended (or failed, or was dropped)
        self.futures: set[concurrent.futures.Future] = set()
        # A list's, tuple's or range's iterator knows how many items it has
        # left: the feeder ends such an input with its last chunk, rather
        # than on a pass of its own that reads nothing (`_Dispatcher._cut`).
        self.sized = type(items) in _SIZED_ITERATORS

    def out(self, state: str) -> int:
        """Chunks that count against the window: after `Pool.close`, an imap
        no longer waits for its consumer, so that `Pool.join` can finish."""
        return self.chunks - (self.consumed if self.lazy and state == RUN else self.done)

    def has_room(self, state: str) -> bool:
        return not self.exhausted and (self.window is None or self.out(state) < self.window)

    def finished(self) -> bool:
        return self.exhausted and self.done == self.chunks

    def on_last_chunk(self) -> bool:
        """Whether the next chunk surely ends the input: a sized one, with at
        most a chunk of a fixed size left (as an ``apply_async``'s one item)."""
        return (self.sized and self.chunker.fixed is not None
                and operator.length_hint(self.items) <= self.chunker.fixed)

    def sink(self):
        """Where the results go; None once an imap's iterator was dropped."""
        return self._sink() if self.lazy else self._sink

    def dropped(self) -> bool:
        return self.lazy and self._sink() is None


class _Cut(NamedTuple):
    """A chunk the feeder cut from a feed's input, to submit."""
    feed: _Feed
    number: int         # the feed's how-manieth chunk
    start: int          # where in the feed's input its items start
    items: list
    last: bool          # the input ends with it


class _Dispatcher:
    """Reads the feeds, submits their chunks, and delivers what comes back.

    It owns the client, and the private cluster if there is one; `Pool` is
    a thin front, so that a pool the caller dropped can be garbage collected
    (and terminated) while these threads still run.

    A pass of the feeder costs the same however many calls are
    outstanding: ``feeds`` holds only the inputs still being read (an
    ``apply_async`` leaves it with its one chunk), a finished feed leaves
    ``unfinished`` as its last chunk comes back, and the feeds are searched
    for a dropped imap iterator only when one was dropped. (A scan of every
    outstanding call on every pass made 3,000 ``apply_async`` calls take
    over a second.) A pass sends a run of ``apply_async`` calls at once
    (`_next_feeds`).
    """

    def __init__(self, client: Client, cluster: LocalCluster | None, limit: int | None):
        self.client = client
        self.cluster = cluster
        self.limit = limit          # most jobs out at once, all feeds together
        self.cond = threading.Condition()
        self.state = RUN
        self.feeds: deque[_Feed] = deque()          # input left to read, in the order of the calls
        self.unfinished: dict[_Feed, None] = {}     # input left, or jobs out: an ordered set
        self.any_dropped = False                    # an imap iterator was dropped since the last look
        self.in_flight = 0
        self._ending = threading.Lock()
        self._ended = False
        self.thread = threading.Thread(target=self._run, name="mpqueue-pool-feeder", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """An imap iterator was dropped: its feed stops (see `_next_feeds`)."""
        with self.cond:
            self.any_dropped = True
            self.cond.notify_all()

    def add(self, feed: _Feed) -> None:
        with self.cond:
            if self.state != RUN:
                raise ValueError("Pool not running")
            self.feeds.append(feed)
            self.unfinished[feed] = None
            self.cond.notify_all()

    # -- with the condition held --------------------------------------------------------

    def _exhaust(self, feed: _Feed) -> None:
        """The feed's input ended (or failed, or its consumer dropped it)."""
        if not feed.exhausted:
            feed.exhausted = True
            self.feeds.remove(feed)     # most often the first: O(its place in the deque)
            self._forget_if_finished(feed)

    def _chunk_finished(self, feed: _Feed) -> None:
        feed.done += 1
        self._forget_if_finished(feed)

    def _forget_if_finished(self, feed: _Feed) -> None:
        if feed.finished():
            self.unfinished.pop(feed, None)

    # -- the feeder thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                feeds, dropped = self._next_feeds()
            if dropped:
                for future in dropped:
                    future.cancel()
                continue
            if not feeds:
                return
            cuts = [cut for cut in map(self._cut, feeds) if cut is not None]
            with self.cond:
                for cut in cuts:
                    self._count_in(cut)
            futures = [self._submit(cut) for cut in cuts]
            with self.cond:
                for cut, future in zip(cuts, futures, strict=True):
                    # Kept to withdraw it, unless it is over (its _chunk_done has
                    # run, or will, and needs nothing from here).
                    if future is not None and not future.done():
                        cut.feed.futures.add(future)
            # Hold nothing while waiting: a finished call's results must not
            # outlive the caller's last reference to them.
            feeds = dropped = cuts = futures = cut = future = None  # type: ignore[assignment]

    def _next_feeds(self) -> tuple[list[_Feed], list]:
        """Wait for a feed with room (and room under the limit). With the condition held.

        Returns the first feed with room and, while each is down to its last
        chunk (as every ``apply_async`` is), the next ones with room, up to
        `FEED_BATCH` and the limit. A chunk of each, in this order, is what
        one feed at a time would send; sent together, they cost the feeder
        three holds of the condition in all rather than two or three each.
        """
        while True:
            if self.state == TERMINATE:
                return [], []
            if self.any_dropped:
                self.any_dropped = False
                withdraw: list[concurrent.futures.Future] = []
                for feed in [f for f in self.feeds if f.dropped()]:
                    self._exhaust(feed)     # its consumer is gone: withdraw what it has out
                    withdraw += feed.futures
                if withdraw:
                    return [], withdraw
            if not self.unfinished and self.state == CLOSE:
                return [], []
            room = FEED_BATCH if self.limit is None else min(FEED_BATCH, self.limit - self.in_flight)
            batch: list[_Feed] = []
            for feed in self.feeds:
                if len(batch) == room:
                    break
                if feed.has_room(self.state):
                    batch.append(feed)
                    if not feed.on_last_chunk():
                        break
            if batch:
                return batch, []
            feed = None     # type: ignore[assignment]  # not kept alive while we wait
            self.cond.wait()

    def _cut(self, feed: _Feed) -> _Cut | None:
        """The next chunk of the feed's input; None if the input ended (or
        raised) instead. Only the feeder thread reads the input, and moves
        ``feed.chunks`` and ``feed.position`` on (`_count_in`)."""
        try:
            items = list(itertools.islice(feed.items, feed.chunker.size()))
        except BaseException as e:      # the caller's input raised: that ends it
            self._end_input(feed, e)
            return None
        if not items:
            self._end_input(feed, None)
            return None
        last = feed.sized and operator.length_hint(feed.items) == 0
        return _Cut(feed, feed.chunks, feed.position, items, last)

    def _count_in(self, cut: _Cut) -> None:
        """With the condition held: the chunk is out, before it is submitted,
        so that its job's end (`_chunk_done`) always comes after."""
        feed = cut.feed
        feed.chunks += 1
        feed.position += len(cut.items)
        self.in_flight += 1
        if cut.last:
            self._exhaust(feed)

    def _submit(self, cut: _Cut) -> concurrent.futures.Future | None:
        """Submit a chunk and follow its job: None if it could not go, and
        failed (with what pickling raised, as the stdlib's pool would)."""
        feed = cut.feed
        if cut.last:
            # The sink learns how many chunks there are before the last can
            # come back: a map's result, and its callback, come with that
            # chunk, in the collect thread.
            self._input_ended(feed, cut.number + 1, None)
        try:
            future = self.client.submit(feed.call, cut.items)
        except pickle.PicklingError as e:
            self._fail(cut, e.__cause__ or e, ends_input=False)     # the rest of the input goes on
            return None
        except Exception as e:          # the client is closed, or lost its broker
            self._fail(cut, e, ends_input=True)
            return None
        future.add_done_callback(functools.partial(
            self._chunk_done, feed, cut.number, cut.start, len(cut.items)))
        return future

    def _fail(self, cut: _Cut, error: BaseException, ends_input: bool) -> None:
        feed = cut.feed
        self._deliver(feed, cut.number, cut.start, False, error)
        with self.cond:
            self.in_flight -= 1
            self._chunk_finished(feed)
            if ends_input:
                self._exhaust(feed)
        if ends_input and not cut.last:
            self._input_ended(feed, cut.number + 1, None)

    def _end_input(self, feed: _Feed, error: BaseException | None) -> None:
        with self.cond:
            self._exhaust(feed)
            chunks = feed.chunks
        self._input_ended(feed, chunks, error)

    @staticmethod
    def _input_ended(feed: _Feed, chunks: int, error: BaseException | None) -> None:
        sink = feed.sink()
        if sink is not None:
            sink._input_done(chunks, error)

    # -- the client's collect thread ------------------------------------------------

    def _chunk_done(self, feed: _Feed, index: int, start: int, items: int,
                    future: concurrent.futures.Future) -> None:
        # The future is done: the base class answers at once, where
        # JobFuture's result() and exception() would first take the client's
        # lock (which its collect and send threads contend for), to see
        # whether to collect for themselves.
        value: Any
        try:
            error = concurrent.futures.Future.exception(future, 0)
        except concurrent.futures.CancelledError:
            ok, value = False, concurrent.futures.CancelledError(
                "the job was withdrawn: the pool was terminated")
        else:
            if error is not None:
                ok, value = False, _with_stdlib_cause(error)
            else:
                value, seconds = concurrent.futures.Future.result(future, 0)
                ok = True
                feed.chunker.observe(items, seconds)
        # Results (and callbacks) first: once join() returns, all have run.
        self._deliver(feed, index, start, ok, value)
        with self.cond:
            feed.futures.discard(future)
            self.in_flight -= 1
            self._chunk_finished(feed)
            # Wake the feeder only if this may let it go on: a limit or a
            # window with room again, or a closing pool's last job done.
            if (self.limit is not None or (feed.window is not None and not feed.exhausted)
                    or self.state != RUN):
                self.cond.notify_all()

    @staticmethod
    def _deliver(feed: _Feed, index: int, start: int, ok: bool, value: Any) -> None:
        sink = feed.sink()
        if sink is not None:
            sink._chunk_done(index, start, ok, value)

    # -- the consumer's thread ------------------------------------------------------

    def _consumed(self, feed: _Feed) -> None:
        with self.cond:
            feed.consumed += 1
            self.cond.notify_all()

    # -- ending -----------------------------------------------------------------------

    def close(self) -> None:
        with self.cond:
            if self.state == RUN:
                self.state = CLOSE
            self.cond.notify_all()

    def terminate(self) -> None:
        with self.cond:
            self.state = TERMINATE
            self.cond.notify_all()
        self._end()

    def join(self) -> None:
        with self.cond:
            if self.state == RUN:
                raise ValueError("Pool is still running")
        self._end()

    def _end(self) -> None:
        """Wait for the feeder: after `close`, it ends once every input is read
        and every job finished; after `terminate`, at once. Then stop the
        jobs still out (if terminating), the client, and the private cluster."""
        with self._ending:
            if self._ended:
                return
            if self.thread is not threading.current_thread():
                self.thread.join()
            if self.state == TERMINATE:
                self._withdraw_everything()
                # Not waiting: a job withdrawn by force resolves here at once,
                # and the client's collect thread may sit out its long poll.
                self.client.shutdown(wait=False)
            else:
                self.client.shutdown(wait=True)
            if self.cluster is not None:
                self.cluster.stop()
            self._ended = True

    def _withdraw_everything(self) -> None:
        with self.cond:
            feeds = list(self.unfinished)
        stopped = concurrent.futures.CancelledError("the pool was terminated")
        for feed in feeds:
            if not feed.exhausted:
                self._end_input(feed, stopped)
        # Jobs not running yet, in one call; then the running ones, by force.
        self.client.shutdown(wait=False, cancel_futures=True)
        with self.cond:
            running = [f for feed in feeds for f in feed.futures if not f.done()]
        for future in running:
            try:
                self.client.cancel(future, force=True)
            except MpqueueError:
                pass    # the broker is gone: the client fails the future


# -- the pool -----------------------------------------------------------------------

class Pool:
    """A drop-in for `multiprocessing.pool.Pool` whose jobs run on an mpqueue cluster.

    With no ``address`` (and no ``$MPQUEUE_ADDRESS``), it starts a private
    local cluster with ``processes`` worker processes (default: the usable
    cores), which stops with the pool. With an ``address``, it uses that
    cluster, and ``processes`` bounds how many of this pool's jobs are queued
    or running there at once (None: no bound). ``authkey`` is as for `Client`.

    ``initializer(*initargs)`` runs in a worker's process before the first
    job of this pool that lands there (see `_Call._initialize`).
    ``maxtasksperchild`` is checked, and not enforced: the cluster's processes
    are the workers', shared by every client; ``mpqueue worker
    --max-tasks-per-child`` recycles them. docs/migrating.md lists every
    difference from the standard library's pool.
    """

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None, *,
                 address: str | None = None, authkey: bytes | str | None = None):
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or isinstance(maxtasksperchild, bool) \
                    or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
            warnings.warn("mpqueue.Pool does not enforce maxtasksperchild: the cluster's processes "
                          "belong to its workers (see mpqueue worker --max-tasks-per-child)",
                          RuntimeWarning, stacklevel=2)
        self._id = uuid.uuid4().hex
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._calls: OrderedDict[tuple[int, str], tuple[Callable, _Call]] = OrderedDict()
        self._calls_lock = threading.Lock()
        address = address or os.environ.get("MPQUEUE_ADDRESS") or None
        cluster = None
        if address is None:
            self._processes = processes or usable_cpus()
            cluster = LocalCluster(self._processes)
            try:
                client = Client(format_address(cluster.address), authkey=cluster.authkey,
                                reconnect_timeout=0)
            except BaseException:
                cluster.stop()
                raise
        else:
            client = Client(address, authkey=authkey)
            try:
                self._processes = processes or cluster_procs(client.address, resolve_authkey(authkey)) \
                    or usable_cpus()
            except BaseException:
                client.shutdown()
                raise
        self._dispatcher = _Dispatcher(client, cluster, None if cluster else processes)
        # Like the standard library's pools: terminated at interpreter exit.
        atexit.register(_terminate_at_exit, weakref.ref(self))

    def __repr__(self) -> str:
        where = "local cluster" if self._dispatcher.cluster else "cluster"
        return (f"<mpqueue.Pool state={self._dispatcher.state} processes={self._processes} "
                f"{where} at {format_address(self._dispatcher.client.address)}>")

    # -- submitting ---------------------------------------------------------------------

    def apply(self, func: Callable, args: Iterable = (), kwds: dict | None = None) -> Any:
        """``func(*args, **kwds)`` on the cluster; waits for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable = (), kwds: dict | None = None,
                    callback: Callable | None = None,
                    error_callback: Callable | None = None) -> AsyncResult:
        result = AsyncResult(callback, error_callback)
        self._dispatcher.add(_Feed(self._call(func, APPLY), iter([(tuple(args), dict(kwds or {}))]),
                                   _ONE_ITEM, None, result))
        return result

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """``[func(x) for x in iterable]``, on the cluster."""
        return self._map_async(func, iterable, MAP, chunksize, None, None).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None,
                  error_callback: Callable | None = None) -> MapResult:
        return self._map_async(func, iterable, MAP, chunksize, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """``[func(*args) for args in iterable]``, on the cluster."""
        return self._map_async(func, iterable, STARMAP, chunksize, None, None).get()

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None,
                      error_callback: Callable | None = None) -> MapResult:
        return self._map_async(func, iterable, STARMAP, chunksize, callback, error_callback)

    def imap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> IMapIterator:
        """Results in order, as an iterator; the input is read only a window ahead."""
        return self._imap(IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func: Callable, iterable: Iterable,
                       chunksize: int | None = None) -> IMapUnorderedIterator:
        """Results as they finish, as an iterator; the input is read only a window ahead."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize)

    def _map_async(self, func, iterable, kind, chunksize, callback, error_callback) -> MapResult:
        self._check_running()
        _check_chunksize(chunksize)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)       # as the stdlib does: map's input is read at once
        cap = max(1, -(-len(iterable) // (4 * self._processes)))
        result = MapResult(callback, error_callback)
        self._dispatcher.add(_Feed(self._call(func, kind), iter(iterable),
                                   _Chunker(chunksize, cap), self._window(chunksize), result))
        return result

    def _imap(self, cls: type[_Iterator], func, iterable, chunksize) -> _Iterator:
        self._check_running()
        _check_chunksize(chunksize)
        it = cls(self._dispatcher)
        it._init_slots()
        it._feed = _Feed(self._call(func, MAP), iter(iterable), _Chunker(chunksize, MAX_AUTO_CHUNK),
                         self._window(chunksize), it, on_drop=self._dispatcher.wake)
        self._dispatcher.add(it._feed)
        return it

    def _window(self, chunksize: int | None) -> int:
        if chunksize is None:
            return AUTO_WINDOW_PER_PROC * self._processes
        return max(FIXED_WINDOW, AUTO_WINDOW_PER_PROC * self._processes)

    def _call(self, fn: Callable, kind: str) -> _Call:
        """One `_Call` per function and kind, so the client pickles it once.
        The 128 made last are kept; a hit (every call but the first) takes no lock."""
        key = (id(fn), kind)
        entry = self._calls.get(key)
        if entry is None or entry[0] is not fn:
            with self._calls_lock:
                entry = self._calls[key] = (fn, _Call(fn, kind, self._id, self._initializer,
                                                      self._initargs))
                if len(self._calls) > 128:
                    self._calls.popitem(last=False)
        return entry[1]

    def _check_running(self) -> None:
        if self._dispatcher.state != RUN:
            raise ValueError("Pool not running")

    # -- ending -------------------------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; what was submitted runs to the end."""
        self._dispatcher.close()

    def terminate(self) -> None:
        """Stop now: jobs not started are withdrawn, running ones killed, and
        their results fail with `concurrent.futures.CancelledError`."""
        self._dispatcher.terminate()

    def join(self) -> None:
        """After `close`, wait for every job; after `terminate`, for the cleanup."""
        self._dispatcher.join()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()

    def __del__(self, _warn=warnings.warn):
        dispatcher = getattr(self, "_dispatcher", None)
        if dispatcher is None or dispatcher._ended:
            return
        if dispatcher.state == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
        # Not in this thread: it may be any, one of the pool's own included.
        try:
            threading.Thread(target=dispatcher.terminate, name="mpqueue-pool-terminate").start()
        except RuntimeError:
            pass    # interpreter shutdown: the atexit handler or the lifelines see to it


def _check_chunksize(chunksize: int | None) -> None:
    if chunksize is not None and chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize}")


def _terminate_at_exit(ref: weakref.ref) -> None:
    pool = ref()
    if pool is not None:
        pool.terminate()

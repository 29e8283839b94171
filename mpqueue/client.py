"""The client: a `concurrent.futures.Executor` whose jobs run on the cluster.

::

    submit() ──▶ outbox ──send thread──▶ broker.submit(batch)
    Future ◀── collect thread ◀── broker.collect(ack) ── results, in batches

`submit` pickles the arguments in the caller's thread (so an unpicklable one
fails that call, and nothing else) and leaves the job in an outbox; a send
thread ships whatever has gathered in one round trip, so jobs batch up by
themselves while a call is in flight (a lone submit goes from the caller's
thread). A collect thread blocks in the broker until results exist and
resolves the futures; each call acknowledges the previous batch, and only
then does the broker forget it. A thread blocked in `JobFuture.result`
collects for itself meanwhile, and the broker answers it first: a result
reaches the thread waiting for it without a handoff between threads.

``max_pending`` is a semaphore: `submit` takes a slot, a finished future gives
it back, so a user can feed a million items without filling the broker.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized

from . import __version__, shm
from .cluster import LocalCluster
from .config import SETTINGS, format_address, parse_address, resolve_authkey, warn_unknown_variables
from .errors import BrokerUnavailable, ClusterShutdown, JobTimeout, MpqueueError, WorkerLost
from .protocol import (
    ClientHello,
    Delivery,
    Failure,
    Kick,
    Options,
    Payload,
    Status,
    Submission,
    Warned,
    batch_length,
    digest,
    dumps_noting,
    dumps_payload,
    loads,
    out_of_band,
    payload_size,
    too_large,
    unpack_exception,
    wrap_function,
)
from .shipping import Bundle, Shipper, function_name
from .transport import Reconnecting, connect

log = logging.getLogger("mpqueue.client")

#: How many jobs `Client.map` keeps in flight ahead of the consumer, when
#: ``max_pending`` does not say.
MAP_WINDOW = 1024

#: Submits closer together than this, while jobs are pending, are a burst,
#: batched by the send thread.
BURST_GAP = 0.001
#: With no job pending, results received are acknowledged after this long,
#: unless a new job comes first: its collect call carries the acknowledgement,
#: which spares a call per job to a client that submits one at a time.
ACK_DELAY = 0.1

_UNSET: Any = object()


class _FunctionCache:
    """Each distinct function is pickled once: by identity, most recent first.

    What travels is the pickle behind a header naming the code to ship with
    it and the package versions it needs (`shipping`): one per set of
    modules the job's arguments add to the function's own, most often none.

    An entry holds its function weakly where it can (as the stdlib executors
    hold nothing once a job is done): a bound method must not keep its
    object, and whatever that holds, alive. A dead function's entry goes, so
    its ``id`` cannot name a new one. Functions that take no weak reference
    (builtins) are held: they live as long as their module anyway.
    """

    def __init__(self, shipper: Shipper, size: int = 128):
        self._shipper = shipper
        self._entries: OrderedDict[int, tuple[Callable[[], Any], bytes, frozenset[str], dict]] = OrderedDict()
        self._size = size
        # Reentrant: a weak reference's callback (`_drop`) can run in this
        # thread, from a garbage collection, while it holds the lock in `get`.
        self._lock = threading.RLock()

    def get(self, fn: Callable, modules: frozenset[str] = frozenset()) -> tuple[bytes, bytes, Bundle | None]:
        """``(digest, blob, bundle)`` for ``fn`` with arguments whose pickle
        names ``modules``: the blob to send, and the code it needs shipped."""
        with self._lock:
            entry = self._entries.get(id(fn))
            if entry is not None and entry[0]() is fn:
                self._entries.move_to_end(id(fn))
                found = entry[3].get(modules)
                if found is not None:
                    return found
        if entry is None or entry[0]() is not fn:
            pickled, named = _pickle("function", fn)
            try:
                ref: Callable[[], Any] = weakref.ref(fn, functools.partial(self._drop, id(fn)))
            except TypeError:
                ref = functools.partial(_same, fn)
            entry = (ref, pickled, frozenset(named), {})
        header, bundle = self._shipper.header(entry[2] | modules)
        blob = wrap_function(header._replace(name=function_name(fn)).as_dict(), entry[1])
        found = entry[3][modules] = (digest(blob), blob, bundle)
        with self._lock:
            self._entries[id(fn)] = entry
            self._entries.move_to_end(id(fn))
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return found

    def _drop(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]


#: Every Client of this process not shut down: `mpqueue.shared` uses the one
#: open, when there is one.
_OPEN: weakref.WeakSet = weakref.WeakSet()


def open_clients() -> list["Client"]:
    """This process's Clients that are not shut down."""
    return [c for c in list(_OPEN) if not c._closed]


def _same(obj: Any) -> Any:
    return obj


def _pickle(what: str, obj: Any, dump: Callable[[Any], tuple[Any, set[str]]] = dumps_noting) -> tuple[Any, set[str]]:
    """The pickle, and the modules it names (which the workers must import);
    ``dump`` is `dumps_payload` for arguments."""
    try:
        return dump(obj)
    except Exception as e:
        import pickle
        raise pickle.PicklingError(f"cannot send the job's {what} to the cluster: {e}") from e


#: Keywords of other executors that are no job option here, and what to do instead.
_ELSEWHERE = {
    "max_workers": "the cluster's size is set where its workers start: `mpqueue worker ADDRESS "
                   "--procs N` (a private Client() cluster uses every usable core)",
    "processes": "the cluster's size is set where its workers start: `mpqueue worker ADDRESS --procs N`",
    "initializer": "use mpqueue.Pool(initializer=...), or the joblib backend's initializer",
    "initargs": "use mpqueue.Pool(initializer=..., initargs=...)",
    "max_tasks_per_child": "`mpqueue worker --max-tasks-per-child N` recycles a worker's processes",
    "mp_context": "workers start their processes with forkserver; there is no context to choose",
}
_JOB_OPTIONS = ("timeout", "retries", "retry_delay", "retry_on", "priority")


def _options(base: Options, where: str, options: dict[str, Any]) -> Options:
    """``base`` with the given per-job options changed, checked. ``where``
    names the call, for an unknown keyword's error."""
    for name in options:
        if name not in _JOB_OPTIONS:
            hint = _ELSEWHERE.get(name, "job options are " + ", ".join(_JOB_OPTIONS))
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}: {hint}")
    return _changed(base, **options)


def _changed(base: Options, timeout: float | None = _UNSET, retries: int = _UNSET,
             retry_delay: float = _UNSET, retry_on=_UNSET, priority: int = _UNSET) -> Options:
    changes: dict[str, Any] = {}
    if timeout is not _UNSET:
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds, or None")
        changes["timeout"] = timeout
    if retries is not _UNSET:
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError("retries must be a whole number >= 0")
        changes["retries"] = retries
    if retry_delay is not _UNSET:
        if not retry_delay >= 0:
            raise ValueError("retry_delay must be >= 0 seconds")
        changes["retry_delay"] = float(retry_delay)
    if retry_on is not _UNSET:
        if retry_on is None:
            changes.update(retry_on=None, retry_timeouts=True)
        else:
            types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
                raise TypeError("retry_on takes an exception class or a tuple of them")
            changes.update(retry_on=_pickle("retry_on", types)[0],
                           retry_timeouts=issubclass(JobTimeout, types))
    if priority is not _UNSET:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError("priority must be an int")
        changes["priority"] = priority
    return base._replace(**changes)


class JobFuture(concurrent.futures.Future):
    """A `concurrent.futures.Future` whose `cancel` withdraws the job from the cluster."""

    def __init__(self, client: "Client", seq: int, fn: Callable):
        super().__init__()
        self._client = client
        self._seq = seq
        self._fn: Callable | None = fn      # to name its source in a remote traceback; None once done

    def cancel(self) -> bool:
        """Withdraw the job if it has not started running: True if it will not run."""
        if self.done():
            return self.cancelled()
        return self._client._withdraw([self], force=False)[0]

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(self._collect_within(timeout))
        except KeyboardInterrupt:
            if not self._client._interrupted():
                raise
        # A fresh one, outside the handler: no traceback of our waits, nor chained to it.
        raise KeyboardInterrupt

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(self._collect_within(timeout))
        except KeyboardInterrupt:
            if not self._client._interrupted():
                raise
        raise KeyboardInterrupt

    def _collect_within(self, timeout: float | None) -> float | None:
        """Collect our result in this thread, within ``timeout``; returns
        what is left of it (`Client._collect_for`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._client._collect_for(self, deadline)
        return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Submitter:
    """`submit`, `map` and `options`: shared by `Client` and its option views."""

    _client: "Client"
    _defaults: Options

    def options(self, **options: Any) -> "_Submitter":
        """A view of the client whose jobs get these options (``timeout``,
        ``retries``, ``retry_delay``, ``retry_on``, ``priority``); nothing is
        taken from the keywords of your function."""
        view = _Submitter()
        view._client, view._defaults = self._client, _options(self._defaults, "options()", options)
        return view

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` on the cluster."""
        return self._client._submit(fn, _pickle("arguments", (args, kwargs), dumps_payload), False, self._defaults)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator:
        """Like `Executor.map`: results in order, lazily.

        The input is read ahead only as far as ``max_pending`` (or a window of
        1024 jobs) allows, so an endless generator works. With ``chunksize``
        > 1, each job applies ``fn`` to that many items. With ``progress``, a
        bar on stderr shows done/total, rate and time left (nothing when
        stderr is not a terminal).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        client, options = self._client, self._defaults
        deadline = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables)
        if chunksize == 1:
            def submit_next():
                for args in items:
                    return client._submit(fn, _pickle("arguments", (args, {}), dumps_payload), False, options)
        else:
            def submit_next():
                chunk = list(itertools.islice(items, chunksize))
                if chunk:
                    return client._submit(fn, _pickle("arguments", chunk, dumps_payload), True, options)
        window = client._max_pending or MAP_WINDOW
        futures: deque = deque()
        while len(futures) < window and (f := submit_next()) is not None:
            futures.append(f)
        results = client._map_results(futures, submit_next, deadline, chunksize > 1)
        if progress:
            lengths = [len(i) for i in iterables if isinstance(i, Sized)]
            return _with_progress(results, min(lengths) if len(lengths) == len(iterables) else None)
        return results


class Client(_Submitter, concurrent.futures.Executor):
    """Submit jobs to an mpqueue cluster and get `concurrent.futures.Future` back.

    ``address`` is ``"HOST:PORT"``; None means ``$MPQUEUE_ADDRESS`` or, if that
    is unset, a private local cluster (a broker and a worker using every usable
    core) that lives as long as this client. ``authkey`` defaults to
    ``$MPQUEUE_AUTHKEY``, then to the key file the broker wrote on this host.
    ``max_pending`` bounds how many of this client's jobs are queued or running
    at once: `submit` blocks for a free slot. If the broker goes away, the
    client tries to reconnect for ``reconnect_timeout`` seconds (default
    ``$MPQUEUE_RECONNECT_TIMEOUT``, else 60) with its futures still pending.

    Your own modules (not installed packages) that jobs use travel with them
    (``ship=False``: they don't; a list of module names and directories:
    those too). A worker whose installed packages differ in version from this
    process's, for those jobs use, fails them with `EnvironmentMismatch`
    (``on_mismatch="warn"``: runs them, and warns here; ``"ignore"``). See
    docs/multihost.md.

    The other keywords are default job options, as for `options`.
    """

    def __init__(self, address: str | None = None, *, authkey: bytes | str | None = None,
                 max_pending: int | None = None, reconnect_timeout: float | None = None,
                 ship: bool | Sequence[str] = True, on_mismatch: str = "raise", **options: Any):
        if max_pending is not None and max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._client = self
        self._defaults = _options(Options(), "Client()", options)
        self._cluster = None
        warn_unknown_variables()
        address = address or os.environ.get("MPQUEUE_ADDRESS") or None
        if address is None:
            self._cluster = LocalCluster()
            self.address, authkey = self._cluster.address, self._cluster.authkey
            log.info("no address given, and $MPQUEUE_ADDRESS is unset: started a private cluster on this "
                     "host, at %s; to use a broker, pass Client(\"HOST:PORT\") or set MPQUEUE_ADDRESS",
                     format_address(self.address))
        else:
            self.address, authkey = parse_address(address), resolve_authkey(authkey)
        self.session = uuid.uuid4().hex
        self._max_pending = max_pending
        self._slots = threading.BoundedSemaphore(max_pending) if max_pending else None
        self._functions = _FunctionCache(Shipper(ship, on_mismatch))
        self._bundles: dict[bytes, Bundle] = {}     # function digest -> the code shipped with it
        self._code_sent: set[bytes] = set()         # bundles the broker has had from us
        self._warned: set[str] = set()
        self._lock = threading.Condition()     # the collect thread and cancels wait on it
        # The send thread waits here, on the same lock.
        self._to_send = threading.Condition(self._lock)     # type: ignore[arg-type]  # a Condition is a lock
        self._futures: dict[int, JobFuture] = {}
        self._outbox: list[tuple[Submission, bytes]] = []
        self._sending = False
        self._in_flight: set[int] = set()  # the jobs of the batch being sent
        self._last_submit = 0.0
        self._seq = itertools.count(1)
        self._closed = False
        self._failure: BaseException | None = None
        self._ack = self._acked = 0     # the last result number received, and acknowledged
        self._collecting_for: int | None = None  # a thread waiting on this job's result collects (_collect_for)
        if reconnect_timeout is None:
            # Nobody restarts a private cluster's broker: no point waiting for one.
            reconnect_timeout = 0 if self._cluster else SETTINGS.reconnect_timeout
        try:
            self._broker, _ = connect(self.address, authkey)
            self._link = Reconnecting(self.address, self._rejoin, reconnect_timeout, self._broker)
            reply = self._broker.register(self.session, ClientHello(os.getpid(), __version__))
            self._max_payload: int = reply.max_payload
            # Where the broker's /dev/shm is ours too, large arguments go through it (`shm`).
            self._shm = self._shm_tag(reply.shm_probe)
        except BaseException:
            if self._cluster is not None:
                self._cluster.stop()
            raise
        self._sender = threading.Thread(target=self._send_loop, name="mpqueue-send", daemon=True)
        self._collector = threading.Thread(target=self._collect_loop, name="mpqueue-collect", daemon=True)
        self._sender.start()
        self._collector.start()
        _OPEN.add(self)
        # Like the stdlib executors: at interpreter exit, wait for submitted work.
        self._atexit = weakref.WeakMethod(self.shutdown)
        atexit.register(_shutdown_at_exit, self._atexit)

    def __repr__(self) -> str:
        where = "local cluster" if self._cluster else "cluster"
        return f"<mpqueue.Client {where} at {format_address(self.address)}>"

    # -- submitting -----------------------------------------------------------

    def _submit(self, fn: Callable, arguments: tuple[bytearray, set[str]], chunked: bool,
                options: Options) -> JobFuture:
        """Queue ``fn`` with ``arguments`` (their pickle, and the modules it names)."""
        pickled: bytes | bytearray
        pickled, modules = arguments
        key, blob, bundle = self._functions.get(fn, frozenset(modules) if modules else frozenset())
        self._check_open()
        error = too_large("the job's function and arguments pickle", len(blob) + len(pickled), self._max_payload)
        if error is not None:
            raise error
        if self._shm is not None and len(pickled) >= shm.THRESHOLD:
            pickled = shm.write(pickled, self._shm) or pickled     # on the broker's host: no socket
        payload = out_of_band(pickled)
        if self._slots is not None:
            self._take_slot()
        with self._lock:
            if self._closed or self._failure is not None:
                if self._slots is not None:
                    self._slots.release()
                self._check_open()
            seq = next(self._seq)
            future = self._futures[seq] = JobFuture(self, seq, fn)
            if (slots := self._slots) is not None:
                future.add_done_callback(lambda f: slots.release())
            if bundle is not None:
                self._bundles[key] = bundle
            self._outbox.append((Submission(seq, key, payload, chunked, options), blob))
            # A lone submit (not part of a burst: no other job pending, or
            # none submitted for a while) is sent from this thread at once: a
            # handoff to the send thread would cost it latency, and there is
            # nothing for a batch to gather.
            now = time.monotonic()
            alone = (not self._sending and len(self._outbox) == 1
                     and (len(self._futures) == 1 or now - self._last_submit > BURST_GAP))
            self._last_submit = now
            if not alone:
                self._to_send.notify()
                self._lock.notify_all()
                return future
            batch, self._outbox = self._outbox, []
            self._sending = True
            self._in_flight = {sub.seq for sub, _ in batch}
        try:
            self._ship(batch)
        except BaseException:
            # Interrupted (Ctrl-C) mid-send: the caller never gets this future,
            # so the job must not run, nor be waited for at shutdown.
            with self._lock:
                self._futures.pop(seq, None)
                self._sending = False
                self._to_send.notify()
                self._lock.notify_all()
            concurrent.futures.Future.cancel(future)
            raise
        return future

    def _take_slot(self) -> None:
        """Wait for one of ``max_pending``'s slots: a feeding loop spends its
        time here, where Ctrl-C then comes (`_interrupted`)."""
        try:
            self._slots.acquire()       # type: ignore[union-attr]  # only with max_pending
            return
        except KeyboardInterrupt:
            if not self._interrupted():
                raise
        raise KeyboardInterrupt

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("cannot submit to a Client after shutdown")

    def _map_results(self, futures: deque, submit_next, deadline, chunked: bool) -> Iterator:
        # Nothing here refers to a result once it is yielded (nor to its
        # future, which holds it): a consumer that drops it frees it.
        try:
            while futures:
                remaining = None if deadline is None else deadline - time.monotonic()
                futures[0].result(remaining)    # raises, or it is there
                next_future = submit_next()
                if next_future is not None:
                    futures.append(next_future)
                    del next_future
                if chunked:
                    chunk = futures.popleft().result()
                    chunk.reverse()
                    while chunk:
                        yield chunk.pop()
                else:
                    yield futures.popleft().result()
        finally:
            if futures and self._failure is None:
                self._withdraw(list(futures), force=False)

    # -- cancelling -------------------------------------------------------------

    def cancel(self, future: concurrent.futures.Future, force: bool = False) -> bool:
        """Cancel a job. Without ``force``, as `Future.cancel`: only one not yet
        running. With ``force``, a running job's process is killed too (its
        worker replaces it) and the future ends cancelled."""
        if getattr(future, "_client", None) is not self:
            raise ValueError("that future is not one of this client's jobs")
        if future.done():
            return future.cancelled()
        return self._withdraw([future], force)[0]

    def _withdraw(self, futures: list[JobFuture], force: bool) -> list[bool]:
        """Cancel jobs at the broker (or in the outbox, not yet sent), in one call."""
        wanted = {f._seq for f in futures}
        with self._lock:
            while self._sending:        # a batch in flight: let the broker have it first
                self._lock.wait()
            unsent = {sub.seq for sub, _ in self._outbox} & wanted
            self._outbox = [(sub, blob) for sub, blob in self._outbox if sub.seq not in unsent]
        sent = [f for f in futures if f._seq not in unsent and not f.done()]
        verdicts = dict(zip((f._seq for f in sent), self._link.call(
            self._broker.cancel, self.session, [f._seq for f in sent], force) if sent else []))
        withdrawn = [f for f in futures if f._seq in unsent or verdicts.get(f._seq, False)]
        with self._lock:
            for future in withdrawn:
                self._futures.pop(future._seq, None)
            self._lock.notify_all()
        for future in withdrawn:
            concurrent.futures.Future.cancel(future)
        if withdrawn and self._collecting_for is not None:
            self._kick(Kick.WAITING)
        return [future.cancelled() for future in futures]

    # -- closing ----------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close this client (not the cluster; a private local cluster stops with it).

        With ``cancel_futures``, jobs not yet running are withdrawn and their
        futures cancelled; running ones finish.
        """
        with self._lock:
            self._closed = True
            self._to_send.notify()
            self._lock.notify_all()
            pending = list(self._futures.values())
        if not pending and self._failure is None and self._collector.is_alive():
            # Its collect may be parked in the broker while a waiting thread
            # collected: get it out, so that it sees we are closing.
            self._kick(Kick.CLOSING)
        if cancel_futures and pending and self._failure is None:
            try:
                self._withdraw(pending, force=False)
            except BrokerUnavailable:
                pass    # the collector fails them
        if not wait:
            return
        try:
            self._collector.join()
            return
        except KeyboardInterrupt:
            if not self._interrupted():
                raise
        raise KeyboardInterrupt

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """`shutdown(wait=True)`; but a block left by Ctrl-C (met outside this
        client's waits: in `as_completed`, say) first stops the jobs, as a
        Ctrl-C in a wait does (`_interrupted`)."""
        if exc_type is None or not issubclass(exc_type, KeyboardInterrupt):
            self.shutdown(wait=True)
            return
        self._interrupted()
        try:
            self.shutdown(wait=True)
        except KeyboardInterrupt:
            pass    # pressed again: nothing of ours is left to wait for, and one KeyboardInterrupt is on its way

    # -- Ctrl-C -------------------------------------------------------------------

    def _interrupted(self) -> bool:
        """Ctrl-C came while the main thread waited on this client: stop its
        jobs as a user expects. Returns True for the caller to raise a
        KeyboardInterrupt of its own; False if it is not ours to handle (not
        the main thread, or the program handles SIGINT itself).

        The first Ctrl-C withdraws every job of this client not running yet,
        in one call, says so on one line on stderr, and waits for the running
        ones to end. A second one, meanwhile, stops them (as `cancel` with
        ``force``), says so, and returns at once. While the broker handles
        either call, a Ctrl-C is held until it answers (`_holding_ctrl_c`): a
        call cut short would leave us not knowing what it withdrew.
        """
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return False
        try:
            with _holding_ctrl_c():
                pending = self._pending()
                withdrawn = self._withdraw_quietly(pending, force=False)
                running = [f for f in pending if not f.done()]
                if withdrawn or running:
                    line = f"withdrew {withdrawn} queued job{'s' * (withdrawn != 1)}"
                    if running:
                        line += f"; {len(running)} running will finish; Ctrl-C again to stop them"
                    _say(line)
            concurrent.futures.wait(running)
        except KeyboardInterrupt:
            try:
                with _holding_ctrl_c():
                    stopped = self._withdraw_quietly(self._pending(), force=True)
                    _say(f"stopped {stopped} running job{'s' * (stopped != 1)}")
            except KeyboardInterrupt:
                pass    # pressed yet again: out at once, as asked
        return True

    def _pending(self) -> list[JobFuture]:
        with self._lock:
            return [f for f in self._futures.values() if not f.done()]

    def _withdraw_quietly(self, futures: list[JobFuture], force: bool) -> int:
        """`_withdraw`, for a Ctrl-C: how many were withdrawn; none if the
        broker is gone (the collect thread fails the futures then)."""
        if not futures or self._failure is not None:
            return 0
        try:
            return sum(self._withdraw(futures, force))
        except MpqueueError:
            return 0

    # -- threads ------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                # One batch in flight at a time (a lone submit may be sending).
                while self._failure is None and (self._sending or (not self._outbox and not self._closed)):
                    self._to_send.wait()
                if not self._outbox or self._failure is not None:
                    return
                cut = batch_length(self._outbox, lambda job: payload_size(job[0].payload) + len(job[1]))
                batch, self._outbox = self._outbox[:cut], self._outbox[cut:]
                self._sending = True
                self._in_flight = {sub.seq for sub, _ in batch}
            if not self._ship(batch):
                return

    def _ship(self, batch: list[tuple[Submission, bytes]]) -> bool:
        """Send a batch of jobs to the broker (``_sending`` and ``_in_flight`` are
        set). False if it is gone."""
        functions = {sub.fn: blob for sub, blob in batch}
        try:
            self._link.call(self._submit_batch, [sub for sub, _ in batch], functions)
            return True
        except MpqueueError as e:
            self._fail(e)
            return False
        finally:
            with self._lock:
                self._sending = False
                self._in_flight = set()
                if self._outbox or self._closed:
                    self._to_send.notify()
                self._lock.notify_all()

    def _submit_batch(self, submissions: list[Submission], functions: dict[bytes, bytes]) -> None:
        """One submit call, with the code its jobs need that this broker has
        not had from us (all of it again after a reconnect: `_rejoin`)."""
        code = {}
        for fn in functions:
            bundle = self._bundles.get(fn)
            if bundle is not None and bundle.digest not in self._code_sent:
                code[bundle.digest] = bundle.zip
        self._broker.submit(self.session, submissions, functions, code)
        self._code_sent.update(code)

    def _collect_loop(self) -> None:
        kick = False        # whether a thread collecting for itself may wait for what we took
        try:
            while True:
                with self._lock:
                    ack_by = time.monotonic() + ACK_DELAY
                    # Idle while no job is pending but the one a thread collects for itself.
                    while self._failure is None and not kick and not self._uncollected():
                        if self._ack == self._acked:
                            if self._closed and not self._futures:
                                return      # everything collected and acknowledged
                            self._lock.wait()
                        elif self._closed or (left := ack_by - time.monotonic()) <= 0:
                            break
                        else:
                            self._lock.wait(left)
                    if self._failure is not None:
                        return
                    wait = SETTINGS.wait_slice if self._uncollected() else 0
                # A thread collecting for its own result may be parked for
                # one we just settled: the next call gets it out.
                kick = self._collect(wait, kick=Kick.WAITING if kick else None) and self._collecting_for is not None
        except MpqueueError as e:
            self._fail(e)
        finally:
            self._leave()

    def _uncollected(self) -> bool:
        """Whether a pending job's result is for the collect thread to get
        (lock held): any but the one a waiting thread collects for itself."""
        return len(self._futures) > (self._collecting_for in self._futures)

    def _collect(self, wait: float, urgent: bool = False, kick: Kick | None = None, reconnect: bool = True) -> bool:
        """One collect call: acknowledge what we have, resolve what comes.
        Returns whether that settled a future (results come again until
        acknowledged, and another thread may have settled theirs already)."""
        def call():     # made again after a reconnect: with the acknowledgement due then
            ack = self._ack
            return ack, self._broker.collect(self.session, ack, wait, urgent, kick)
        ack, batch = self._link.call(call) if reconnect else call()
        with self._lock:
            self._acked = min(max(self._acked, ack), self._ack)
        settled = False
        for number, delivery in batch:
            settled |= self._resolve(delivery)
            with self._lock:
                self._ack = max(self._ack, number)
        return settled

    def _collect_for(self, future: JobFuture, deadline: float | None) -> None:
        """Wait for ``future`` by collecting in this thread, which spares the
        handoff from the collect thread: the broker answers this call first.
        One thread at a time; the others, and this one after any trouble,
        wait for the collect thread as usual (this one does not wait for a
        reconnect: it has a timeout to keep)."""
        with self._lock:
            if (future.done() or self._collecting_for is not None or self._failure is not None
                    or threading.current_thread() is self._collector):
                return
            self._collecting_for = future._seq
        try:
            while not future.done():
                wait = SETTINGS.wait_slice if deadline is None else min(SETTINGS.wait_slice,
                                                                        deadline - time.monotonic())
                if wait <= 0:
                    return
                self._collect(wait, urgent=True, reconnect=False)
        except MpqueueError:
            return      # the collect thread meets it too, and fails the futures
        finally:
            with self._lock:
                self._collecting_for = None
                closing = self._closed and not self._futures
                if self._futures or self._ack != self._acked:
                    self._lock.notify_all()     # the collect thread takes over, or acknowledges
            if closing:
                self._kick(Kick.CLOSING)   # the collect thread may be parked, with nothing left to wait for

    def _kick(self, kind: Kick) -> None:
        """Get this client's collect calls parked in the broker out at once
        (see `Broker.collect`): WAITING, one a thread collecting for itself
        waits in, for a future settled here; CLOSING, the collect thread's."""
        try:
            self._collect(0, kick=kind, reconnect=False)
        except MpqueueError:
            pass

    def _rejoin(self) -> None:
        """Register again with a broker that came back.

        One with a journal knows this client still, and says which of the
        jobs it confirmed it no longer has (a journal restored from a backup,
        or that lost its last writes to a power failure): those fail. One
        that does not know the client has lost every job it was sent. (Jobs
        not sent yet, or in a batch whose sending was cut short, are sent
        after this.)
        """
        self._code_sent.clear()     # a broker without a journal had none; one with it, no harm
        with self._lock:
            unsent = {sub.seq for sub, _ in self._outbox} | self._in_flight
            pending = [seq for seq in self._futures if seq not in unsent]
        reply = self._broker.register(self.session, ClientHello(os.getpid(), __version__, True, tuple(pending)))
        where = format_address(self.address)
        if reply.known:
            self._max_payload, self._shm = reply.max_payload, self._shm_tag(reply.shm_probe)
            if reply.missing:
                self._lose(reply.missing, BrokerUnavailable(
                    f"the broker at {where} came back without this job (its journal lost it)"))
            return
        if pending:
            error = BrokerUnavailable(
                f"the broker at {where} no longer knows this client (it restarted without a "
                f"journal, or forgot a client away longer than {SETTINGS.client_grace:g} s): its "
                f"{len(pending)} pending job(s) are lost (start the broker with --journal to keep "
                "jobs across restarts)")
            error.final = True      # not retried: the broker is up, and will not remember
            raise error
        # Nothing was lost: carry on with this broker, numbering results afresh.
        reply = self._broker.register(self.session, ClientHello(os.getpid(), __version__))
        self._max_payload, self._shm = reply.max_payload, self._shm_tag(reply.shm_probe)
        self._ack = self._acked = 0

    def _shm_tag(self, probe: str) -> str | None:
        """What our large arguments' files are named with (`shm.tag`) where we
        see the broker's /dev/shm; else None."""
        return shm.tag(self.session, probe) if shm.shares(probe) else None

    def _lose(self, seqs: list[int], error: BaseException) -> None:
        with self._lock:
            futures = [f for seq in seqs if (f := self._futures.pop(seq, None)) is not None]
            self._to_send.notify()      # a failure: it stops
            self._lock.notify_all()
        for future in futures:
            if not future.done():
                try:
                    future.set_exception(error)
                except concurrent.futures.InvalidStateError:
                    pass

    def _resolve(self, delivery: Delivery) -> bool:
        """Settle the future a result is for. Returns whether it was pending."""
        with self._lock:
            future = self._futures.pop(delivery.seq, None)
        if future is None or future.done():
            return False
        fn, future._fn = future._fn, None     # a done future holds nothing of the job's
        try:
            if delivery.status is Status.OK:
                result = self._result(delivery.payload)
                if type(result) is Warned:
                    self._warn(result.warning)
                    result = result.value
                future.set_result(result)
            else:
                future.set_exception(_failure(delivery, fn))
        except concurrent.futures.InvalidStateError:
            pass    # cancelled meanwhile
        except Exception as e:      # the result would not unpickle here
            future.set_exception(e)
        return True

    def _result(self, payload: Payload) -> Any:
        """A result, unpickled: read in place if its job's process left it in
        shared memory (`shm`) on this host, or fetched from the broker."""
        path = shm.path_of(payload)
        if path is None:
            return loads(payload)
        if os.path.exists(path):
            return shm.load(path)
        data = self._broker.payload(self.session, path)
        if data is None:
            raise BrokerUnavailable(f"the broker no longer has the job's result ({path})")
        return loads(data)

    def _warn(self, text: str) -> None:
        """Warn, once per text, of a version difference a job ran with
        (``on_mismatch="warn"``); as from mpqueue: no line of ours is the cause."""
        if text not in self._warned:
            self._warned.add(text)
            warnings.warn_explicit(f"{text} (ran anyway: on_mismatch='warn')", RuntimeWarning, "mpqueue", 0)

    def _fail(self, error: BaseException) -> None:
        """The broker is gone, or refused us: every pending future fails with ``error``."""
        with self._lock:
            if self._failure is None:
                self._failure = error
            seqs = list(self._futures)
        self._lose(seqs, error)

    def _leave(self) -> None:
        self._sender.join()
        if self._failure is None:
            try:
                self._broker.goodbye(self.session)
            except MpqueueError:
                pass
        self._broker.close()
        if self._cluster is not None:
            self._cluster.stop()


def _failure(delivery: Delivery, fn: Callable | None) -> BaseException:
    if delivery.status is Status.ERROR:
        return unpack_exception(delivery.payload, _source_finder(fn))
    if delivery.status is Status.LOST:
        info: Failure = delivery.payload
        if info.signal:
            how = f"killed by {info.signal}, "
        elif info.exitcode is not None:
            how = f"exit code {info.exitcode}, "
        else:
            how = ""
        return WorkerLost(
            f"{info.reason} ({how}pid {info.pid} on {info.host}) after {delivery.attempts} attempt(s)",
            pid=info.pid, exitcode=info.exitcode, signal=info.signal, attempts=delivery.attempts,
            host=info.host)
    if delivery.status is Status.TIMEOUT:
        info = delivery.payload
        return JobTimeout(
            f"the job ran past its timeout of {info.timeout:g} s; killed pid {info.pid} on "
            f"{info.host} (attempt {delivery.attempts})",
            timeout=info.timeout, attempts=delivery.attempts, pid=info.pid, host=info.host)
    if delivery.status is Status.SHUTDOWN:
        return ClusterShutdown("the cluster shut down before this job could run")
    return MpqueueError(f"unknown job status {delivery.status!r}")


def _with_progress(results: Iterator, total: int | None) -> Iterator:
    """Yield ``results`` under a progress bar on stderr: done/total, rate, time left.

    click's bar, since click is a dependency already; hidden when stderr is
    not a terminal, so logs and pipes stay clean.
    """
    import click

    started = time.monotonic()

    def rate(_) -> str:
        elapsed = time.monotonic() - started
        return f"{bar.pos / elapsed:,.1f}/s" if bar.pos and elapsed > 0 else ""

    bar = click.progressbar(results, length=total, label="mpqueue", file=sys.stderr, show_pos=True,
                            show_eta=total is not None, item_show_func=rate,
                            hidden=not sys.stderr.isatty())
    with bar:
        yield from bar


def _source_finder(fn: Callable | None) -> Callable[[str], str | None]:
    """Which file a function named in a remote traceback came from: one of the
    job function's globals by that name, else the job function's own file."""
    code = getattr(fn, "__code__", None)
    namespace = getattr(fn, "__globals__", {})

    def find_file(name: str) -> str | None:
        found = getattr(namespace.get(name), "__code__", None) or code
        return found.co_filename if found is not None else None
    return find_file


def _shutdown_at_exit(method: weakref.WeakMethod) -> None:
    shutdown = method()
    if shutdown is None:
        return
    if isinstance(getattr(sys, "last_exc", getattr(sys, "last_value", None)), KeyboardInterrupt):
        # The program ends on a Ctrl-C met outside this client's waits (in
        # `as_completed`, say, with no `with` block): its queued jobs are no
        # more wanted than if it had come in `result()`.
        shutdown.__self__._interrupted()
    try:
        shutdown()
    except KeyboardInterrupt:
        pass    # pressed while we wait: shutdown has stopped the jobs, and the program is ending


@contextlib.contextmanager
def _holding_ctrl_c() -> Iterator[None]:
    """Hold a Ctrl-C until the block ends, then raise it: for a call to the
    broker that must not be cut short (its connection would be dropped
    mid-call, and what the call did left unknown). A second press raises at
    once: the call may be waiting out a reconnect, and the user means it.
    Main thread only, with Python's own handler in place (`_interrupted`)."""
    presses = 0

    def hold(signum, frame):
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if presses:
        raise KeyboardInterrupt


def _say(line: str) -> None:
    """One line on stderr for the user at the terminal, whatever logging is set to."""
    print(line, file=sys.stderr, flush=True)

"""A joblib backend: `joblib.Parallel` batches run as jobs on an mpqueue cluster.

::

    import mpqueue.joblib           # registers the "mpqueue" backend
    with parallel_config(backend="mpqueue", address="HOST:PORT"):
        Parallel()(delayed(f)(i) for i in range(1000))

    Parallel ──submit(batch, callback)──▶ Client.submit(_RunBatch(f), batch) ──▶ cluster
    Parallel ◀── callback(future), in the client's collect thread ◀── Future done

joblib cuts the calls into batches (`AutoBatchingMixin` sizes them to take
0.2 to 2 s each) and keeps ``2 * n_jobs`` of them out (its ``pre_dispatch``);
each batch is one mpqueue job. The batch travels as the job's argument, not
as its function: the client and the workers keep recent job functions
cached, and a batch holds its calls' data.

joblib's ``initializer(*initargs)`` (given to `Parallel` or to
`parallel_config`) travels with the job function, `_RunBatch`, as an
`_Initializer` named by a token that each `Parallel` call draws afresh (in
`MpqueueBackend.configure`). A worker's processes serve every client, so
rather than once when a process starts (as loky does), it runs in a process
before the first batch of *that call* there, which adds the token to the
process's `_initialized`.

joblib is an optional dependency: ``pip install mpqueue[joblib]``.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

from joblib.parallel import AutoBatchingMixin, ParallelBackendBase, register_parallel_backend

from .client import Client
from .cluster import LocalCluster, cluster_procs, usable_cpus
from .config import format_address, parse_address, resolve_authkey
from .errors import MpqueueError
from .protocol import Wrapper

__all__ = ["MpqueueBackend"]

#: In a worker's process: the tokens of the `Parallel` calls whose initializer ran here.
_initialized: set[str] = set()


class _Initializer(NamedTuple):
    """A `Parallel` call's ``initializer(*initargs)``, sent with each of its
    batches; ``token`` names the call."""

    token: str
    fn: Callable
    args: tuple

    def run_once(self) -> None:
        """Run it in this process, unless it ran here for this call already.

        Once per process and call, however it travels: an initializer sent by
        value (from ``__main__``, say) comes with a private copy of its
        module's globals, which the tasks, sent apart, do not share; so it
        runs once, as loky's does, not once per copy. If it raises, the batch
        fails with its exception, and the call's next batch in this process
        tries it again.
        """
        if self.token in _initialized:
            return
        try:
            self.fn(*self.args)
        except BaseException as exc:
            if hasattr(exc, "add_note"):    # Python 3.11 and later
                exc.add_note("(raised by the initializer of a joblib Parallel call, "
                             "before its tasks ran)")
            raise
        _initialized.add(self.token)


def _initializer(initializer: Callable | None, initargs: Any) -> _Initializer | None:
    """A `Parallel` call's initializer, with a fresh token; None if there is none."""
    if initializer is None:
        return None
    if not callable(initializer):
        raise TypeError(f"initializer must be a callable, got: {initializer!r}")
    return _Initializer(uuid.uuid4().hex, initializer, tuple(initargs))


class _RunBatch(Wrapper):
    """Runs a joblib batch in a worker's process, after the call's initializer
    if it has one. ``fn`` is the batch's (first) function: the client names a
    remote traceback's sources by it."""

    def __init__(self, fn: Callable, init: _Initializer | None = None):
        self.fn = fn
        self.init = init

    def __call__(self, batch: Callable[[], list]) -> list:
        if self.init is not None:
            self.init.run_once()
        return batch()

    def __reduce__(self):
        # The batch brings the functions; ``fn`` is for naming, and stays here.
        return _RunBatch, (None, self.init)


class MpqueueBackend(AutoBatchingMixin, ParallelBackendBase):
    """The ``"mpqueue"`` joblib backend.

    ``address`` is the broker's ``"HOST:PORT"``; None means
    ``$MPQUEUE_ADDRESS`` or, if that is unset, a private local cluster for
    each `Parallel` call. ``authkey`` is as for `Client`. Or pass ``client``,
    an `mpqueue.Client` of yours, which the backend uses and never shuts
    down. ``initializer(*initargs)`` runs in each worker process before the
    first batch of each `Parallel` call there (see `_Initializer`); `Parallel`
    takes them too, and its own win, one by one, as with loky. Other keywords
    are job options (``timeout``, ``retries``, ...), as for `Client.options`,
    and apply to each batch.

    ``n_jobs=-1`` (the default) means every process of the cluster's workers,
    counted when the `Parallel` call starts; ``n_jobs=1`` runs the calls in
    this process, as joblib does for every backend.
    """

    supports_retrieve_callback = True
    default_n_jobs = -1
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, address: str | None = None, *, authkey: bytes | str | None = None,
                 client: Client | None = None, initializer: Callable | None = None,
                 initargs: tuple = (), nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **options: Any):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if client is not None and address is not None:
            raise ValueError("pass an address or a client, not both")
        _initializer(initializer, initargs)     # checked now, drawn per call
        self._initializer, self._initargs = initializer, initargs
        self._init: _Initializer | None = None
        self._address = address
        self._authkey = authkey
        self._given = client
        self._job_options = options
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None
        self._submitter: Any = None
        self._futures: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._wrappers: OrderedDict[int, tuple[Callable, _RunBatch]] = OrderedDict()
        self._aborted = False

    # -- how many ---------------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(self._cluster_size() + 1 + n_jobs, 1)
        return n_jobs

    def _cluster_size(self) -> int:
        """The processes of the cluster's workers. A private cluster gets one
        per usable core; a cluster with no worker yet counts as that many too,
        so that the calls go to it (and wait there) rather than run here."""
        if self._given is not None:
            try:    # the client's own key is not known: try ours
                return cluster_procs(self._given.address, resolve_authkey(self._authkey)) \
                    or usable_cpus()
            except MpqueueError:
                return usable_cpus()
        if self._cluster is not None:
            address, authkey = self._cluster.address, self._cluster.authkey
        else:
            address = self._address or os.environ.get("MPQUEUE_ADDRESS")
            if not address:
                return usable_cpus()
            address, authkey = parse_address(address), resolve_authkey(self._authkey)
        return cluster_procs(address, authkey) or usable_cpus()

    # -- a Parallel call ----------------------------------------------------------------

    def configure(self, n_jobs: int = 1, parallel=None, **backend_kwargs) -> int:
        """The start of a `Parallel` call (or of a ``with Parallel(...)`` block).

        ``backend_kwargs`` are the extra keywords given to `Parallel` (and
        joblib's own, for memory mapping, which do not apply here): of them, an
        ``initializer`` and ``initargs`` override the backend's.
        """
        self.parallel = parallel
        self._init = _initializer(backend_kwargs.get("initializer", self._initializer),
                                  backend_kwargs.get("initargs", self._initargs))
        with self._lock:
            self._wrappers.clear()      # they carry the last call's initializer
        if self._client is None:
            self._connect()
        return self.effective_n_jobs(n_jobs)

    def _connect(self) -> None:
        if self._given is not None:
            client = self._given
        else:
            address = self._address or os.environ.get("MPQUEUE_ADDRESS") or None
            if address is None:
                self._cluster = LocalCluster()
                try:
                    client = Client(format_address(self._cluster.address), authkey=self._cluster.authkey,
                                    reconnect_timeout=0)
                except BaseException:
                    self._cluster.stop()
                    self._cluster = None
                    raise
            else:
                client = Client(address, authkey=self._authkey)
        self._client = client
        self._submitter = client.options(**self._job_options) if self._job_options else client

    def submit(self, func: Callable, callback: Callable | None = None) -> concurrent.futures.Future:
        future = self._submitter.submit(self._wrapper(func), func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit    # its name before joblib 1.5

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def _wrapper(self, batch) -> _RunBatch:
        """One `_RunBatch` per function, so the client pickles it once."""
        items = getattr(batch, "items", None)
        fn = items[0][0] if items else batch
        with self._lock:
            entry = self._wrappers.get(id(fn))
            if entry is None or entry[0] is not fn:
                entry = self._wrappers[id(fn)] = (fn, _RunBatch(fn, self._init))
                if len(self._wrappers) > 32:
                    self._wrappers.popitem(last=False)
            self._wrappers.move_to_end(id(fn))
            return entry[1]

    def retrieve_result_callback(self, future: concurrent.futures.Future) -> list:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call raised: withdraw the batches not started, and kill the running ones."""
        with self._lock:
            futures = list(self._futures)
        self._aborted = True
        client = self._client
        for future in futures:
            if client is not None and not future.done():
                try:
                    client.cancel(future, force=True)
                except MpqueueError:
                    pass    # the broker is gone: the client fails the future

    def terminate(self) -> None:
        """The end of a `Parallel` call: close the client this backend made
        (and its private cluster); a client that was passed in stays open."""
        self.reset_batch_stats()
        if self._client is not None and self._given is None:
            # After an abort, not waiting: the futures are settled, and the
            # client's collect thread may sit out its long poll.
            self._client.shutdown(wait=not self._aborted, cancel_futures=True)
            if self._cluster is not None:
                self._cluster.stop()
            self._client = self._cluster = self._submitter = None
        self._aborted = False
        with self._lock:
            self._wrappers.clear()


register_parallel_backend("mpqueue", MpqueueBackend)

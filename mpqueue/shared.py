"""State and synchronization shared by every process of a cluster, kept by its broker.

::

    from mpqueue import shared

    shared.Counter("items").add(1)
    with shared.Lock("file"):
        ...

The names and semantics follow `threading`, `queue` and
`multiprocessing.managers`; an object is addressed by its name, so every
process that names ``"items"`` gets the same counter. Inside a job, objects
live on the broker the job came from; elsewhere, on the broker of the
``client=`` given, else of the one `Client` open in this process, else at
``$MPQUEUE_ADDRESS``.

Unlike the stdlib's, a lock or permit held by a job whose process dies (or
by a client that goes) is released as soon as the broker learns of it, and
a ``get()`` blocked in a process that dies takes no item. The exact rules:
docs/shared-state.md. Each operation is one round trip to the broker;
values are pickled with cloudpickle and stored there as bytes.
"""

from __future__ import annotations

import os
import pickle
import queue
import threading
import time
import uuid
from typing import Any, Iterable, Iterator

import cloudpickle

from .errors import ConfigError, MpqueueError
from .protocol import dumps, loads, too_large

__all__ = ["Counter", "Dict", "List", "Value", "Queue", "Lock", "RLock", "Semaphore", "Event", "delete"]

#: The longest a blocked call waits in the broker before it asks again.
_SLICE = 2.0
_MAX_NAME = 200
_MISSING: Any = object()

# Set in a job's process by the worker (`pool`): the broker's address and
# key, and the job running now as (id, attempt).
_worker_link: tuple[tuple[str, int], bytes] | None = None
_job: tuple[int, int] | None = None
_job_connection: "_Link | None" = None


class _Link:
    """How a process reaches the broker keeping its shared objects, and who it is there."""

    def __init__(self, broker: Any, session: str, job: bool, max_payload: int):
        self.broker = broker
        self.session = session
        self.job = job
        self.max_payload = max_payload

    def who(self) -> tuple:
        thread = threading.get_ident()
        if self.job:
            if _job is None:
                raise RuntimeError("mpqueue.shared in a job's process, outside a job")
            return ("job", _job[0], _job[1], thread)
        return ("client", self.session, thread)


def _link(client: Any) -> _Link:
    global _job_connection
    if client is not None:
        return _client_link(client)
    if _worker_link is not None:
        if _job_connection is None:
            from .config import SETTINGS
            from .transport import connect
            broker, _ = connect(*_worker_link)
            _job_connection = _Link(broker, f"job-process-{os.getpid()}-{uuid.uuid4().hex[:8]}", True,
                                    int(SETTINGS.max_payload))
        return _job_connection
    from .client import open_clients
    clients = open_clients()
    if len(clients) == 1:
        return _client_link(clients[0])
    address = os.environ.get("MPQUEUE_ADDRESS")
    if len(clients) > 1:
        raise MpqueueError(f"{len(clients)} Clients are open in this process: say which one holds the shared "
                           "object, with client=")
    if not address:
        raise ConfigError("no broker to keep shared objects: open a Client, pass client=, or set MPQUEUE_ADDRESS")
    return _address_link(address)


def _client_link(client: Any) -> _Link:
    link = getattr(client, "_shared_link", None)
    if link is None:
        link = client._shared_link = _Link(client._broker, client.session, False, client._max_payload)
    return link


_address_links: dict[str, _Link] = {}


def _address_link(address: str) -> _Link:
    link = _address_links.get(address)
    if link is None:
        from .config import SETTINGS, parse_address, resolve_authkey
        from .transport import connect
        broker, _ = connect(parse_address(address), resolve_authkey())
        link = _address_links[address] = _Link(broker, f"shared-{uuid.uuid4().hex}", False,
                                               int(SETTINGS.max_payload))
    return link


def _key(key: Any) -> bytes:
    """A dict key as the broker compares it: its pickle. The stdlib's pickler
    (faster, and the same in every process) unless it cannot."""
    try:
        return pickle.dumps(key, protocol=5)
    except Exception:
        return dumps(key)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise ValueError(f"a shared object's name is a non-empty string of at most {_MAX_NAME} characters, "
                         f"not {name!r:.60}")
    return name


class _Shared:
    """A handle on one named object. It pickles as its name: pass it to jobs."""

    _kind = ""

    def __init__(self, name: str, *, client: Any = None, _params: tuple = ()):
        self.name = _check_name(name)
        self._params = _params
        self._client = client
        self._opened: tuple[_Link, int] | None = None
        self._open()    # a conflicting kind or parameters fail here, not on first use

    def __reduce__(self):
        return _rebuild, (type(self), self.name, self._params)

    def __repr__(self) -> str:
        return f"<mpqueue.shared.{type(self).__name__} {self.name!r}>"

    def _open(self) -> tuple[_Link, int]:
        """The link this handle uses and the object's generation: found on
        first use in each process (a handle passed to a job finds its own)."""
        opened = self._opened
        if opened is None:
            link = _link(self._client)
            generation = link.broker.shared_open(link.session, self.name, self._kind, self._params)
            opened = self._opened = (link, generation)
        return opened

    def _call(self, op: str, *args: Any, wait: float = 0.0) -> tuple[bool, Any]:
        link, generation = self._open()
        return link.broker.shared(link.session, link.who(), self.name, generation, op, args, wait)

    def _do(self, op: str, *args: Any) -> Any:
        return self._call(op, *args)[1]

    def _blocking(self, op: str, args: tuple, block: bool, timeout: float | None) -> tuple[bool, Any]:
        """An operation that may wait: parked in the broker, a slice at a time."""
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be a non-negative number")
        if not block:
            return self._call(op, *args)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _SLICE if deadline is None else max(0.0, deadline - time.monotonic())
            done, value = self._call(op, *args, wait=min(left, _SLICE))
            if done or (deadline is not None and time.monotonic() >= deadline):
                return done, value

    def _pack(self, value: Any) -> bytes:
        try:
            data = cloudpickle.dumps(value, protocol=5)
        except Exception as e:
            raise pickle.PicklingError(f"cannot store {type(value).__name__} in shared {self._kind} "
                                       f"{self.name!r}: {e}") from e
        error = too_large(f"a value for shared object {self.name!r} pickles", len(data), self._open()[0].max_payload)
        if error is not None:
            raise error
        return data


def _rebuild(cls, name: str, params: tuple) -> _Shared:
    obj = cls.__new__(cls)
    obj.name, obj._params, obj._client, obj._opened = name, params, None, None
    return obj


def delete(name: str, *, client: Any = None) -> bool:
    """Remove the shared object ``name``, whatever its kind. Handles on it
    fail from then on (a `KeyError`); calls waiting on it fail at once.
    Returns whether it existed."""
    link = _link(client)
    return link.broker.shared_delete(link.session, _check_name(name))


class Counter(_Shared):
    """An integer the broker adds to atomically."""

    _kind = "counter"

    def __init__(self, name: str, *, client: Any = None):
        super().__init__(name, client=client)

    def add(self, n: int = 1) -> int:
        """Add ``n``; the new value."""
        if not isinstance(n, int):
            raise TypeError("Counter.add takes an int")
        return self._do("add", n)

    @property
    def value(self) -> int:
        return self._do("get")


class Dict(_Shared):
    """A dict. Keys are compared by their pickled form: str, int, bytes and
    tuples of them are safe; ``1`` and ``1.0`` are different keys."""

    _kind = "dict"

    def __init__(self, name: str, *, client: Any = None):
        super().__init__(name, client=client)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._do("set", _key(key), self._pack(value))

    def __getitem__(self, key: Any) -> Any:
        found, value = self._do("get", _key(key))
        if not found:
            raise KeyError(key)
        return loads(value)

    def get(self, key: Any, default: Any = None) -> Any:
        found, value = self._do("get", _key(key))
        return loads(value) if found else default

    def __delitem__(self, key: Any) -> None:
        if not self._do("pop", _key(key))[0]:
            raise KeyError(key)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        found, value = self._do("pop", _key(key))
        if found:
            return loads(value)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def __len__(self) -> int:
        return self._do("len")

    def __contains__(self, key: Any) -> bool:
        return self._do("contains", _key(key))

    def items(self) -> list[tuple[Any, Any]]:
        """A snapshot, as a list."""
        return [(loads(k), loads(v)) for k, v in self._do("items")]

    def keys(self) -> list[Any]:
        return [k for k, _ in self.items()]

    def values(self) -> list[Any]:
        return [v for _, v in self.items()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def update(self, other: Any = (), **kwargs: Any) -> None:
        pairs = other.items() if hasattr(other, "items") else other
        self._do("update", {_key(k): self._pack(v) for k, v in [*pairs, *kwargs.items()]})

    def copy(self) -> dict:
        """The whole dict, here."""
        return dict(self.items())


class List(_Shared):
    """A list: append, extend, index, len, iteration (a snapshot), pop."""

    _kind = "list"

    def __init__(self, name: str, *, client: Any = None):
        super().__init__(name, client=client)

    def append(self, value: Any) -> None:
        self._do("append", self._pack(value))

    def extend(self, values: Iterable[Any]) -> None:
        self._do("extend", [self._pack(v) for v in values])

    def __getitem__(self, index: int) -> Any:
        return loads(self._do("getitem", _index(index)))

    def __setitem__(self, index: int, value: Any) -> None:
        self._do("setitem", _index(index), self._pack(value))

    def pop(self, index: int = -1) -> Any:
        return loads(self._do("pop", _index(index)))

    def __len__(self) -> int:
        return self._do("len")

    def __iter__(self) -> Iterator[Any]:
        return iter(self.copy())

    def copy(self) -> list:
        """The whole list, here."""
        return [loads(v) for v in self._do("items")]


def _index(index: Any) -> int:
    if not isinstance(index, int):
        raise TypeError("shared list indices must be integers (slices: take .copy() first)")
    return index


class Value(_Shared):
    """One value: get, set, and compare-and-set (equal pickles compare equal)."""

    _kind = "value"

    def __init__(self, name: str, default: Any = None, *, client: Any = None):
        self._default = default
        super().__init__(name, client=client, _params=(cloudpickle.dumps(default, protocol=5),))

    def get(self) -> Any:
        return loads(self._do("get"))

    def set(self, value: Any) -> None:
        self._do("set", self._pack(value))

    def compare_and_set(self, expected: Any, new: Any) -> bool:
        """Set ``new`` if the value is ``expected`` now, atomically; whether it did."""
        return self._do("cas", self._pack(expected), self._pack(new))


class Queue(_Shared):
    """A FIFO queue, as `queue.Queue`; ``maxsize`` <= 0 is unbounded."""

    _kind = "queue"

    def __init__(self, name: str, maxsize: int = 0, *, client: Any = None):
        super().__init__(name, client=client, _params=(max(0, int(maxsize)),))

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item``; with the queue full, wait for room (`queue.Full` after ``timeout``)."""
        done, _ = self._blocking("put", (self._pack(item),), block, timeout)
        if not done:
            raise queue.Full

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take the oldest item; with none, wait (`queue.Empty` after ``timeout``)."""
        done, value = self._blocking("get", (), block, timeout)
        if not done:
            raise queue.Empty
        return loads(value)

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def qsize(self) -> int:
        return self._do("len")

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        maxsize = self._params[0]
        return maxsize > 0 and self.qsize() >= maxsize


class Lock(_Shared):
    """A lock held by a job or a client (any of its threads may release it)."""

    _kind = "lock"

    def __init__(self, name: str, *, client: Any = None, _params: tuple = ()):
        super().__init__(name, client=client, _params=_params)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        if not blocking and timeout is not None:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return self._blocking("acquire", (), blocking, None if timeout in (None, -1) else timeout)[0]

    def release(self) -> None:
        self._do("release")

    def locked(self) -> bool:
        return self._do("locked")

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RLock(Lock):
    """A reentrant lock: held by one thread of one job or client."""

    _kind = "rlock"


class Semaphore(Lock):
    """A bounded semaphore: at most ``value`` holders at once; releasing a
    permit this job or client does not hold is a `ValueError`."""

    _kind = "semaphore"

    def __init__(self, name: str, value: int = 1, *, client: Any = None):
        if not isinstance(value, int) or value < 0:
            raise ValueError("a Semaphore's value must be a non-negative int")
        super().__init__(name, client=client, _params=(value,))

    def locked(self) -> bool:
        return self._do("value") == 0


class Event(_Shared):
    """A flag: ``wait()`` blocks until it is set."""

    _kind = "event"

    def __init__(self, name: str, *, client: Any = None):
        super().__init__(name, client=client)

    def set(self) -> None:
        self._do("set")

    def clear(self) -> None:
        self._do("clear")

    def is_set(self) -> bool:
        return self._do("is_set")

    def wait(self, timeout: float | None = None) -> bool:
        return self._blocking("wait", (), True, timeout)[0]

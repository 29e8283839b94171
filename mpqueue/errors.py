"""The errors mpqueue raises itself.

A job whose function raised re-raises *that* exception, with the remote
traceback chained as ``__cause__``; the classes here are for everything else:
the system failed, not the user's code.
"""

from __future__ import annotations

import multiprocessing


class MpqueueError(Exception):
    """Base class of the errors mpqueue raises itself."""


class ConfigError(MpqueueError):
    """A bad address, a missing authkey, a bad option."""


class BrokerUnavailable(MpqueueError, ConnectionError):
    """The broker cannot be reached, or went away."""

    #: True when the broker is up and said something another try would not
    #: change: a reconnect stops at once.
    final: bool = False
    #: True when the broker's host name did not resolve.
    unresolved: bool = False


class AuthenticationError(BrokerUnavailable, multiprocessing.AuthenticationError):
    """The broker and this process hold different authkeys, or TLS refused one of them."""


class VersionMismatch(MpqueueError):
    """The broker and this process run Python minor versions or cloudpickle major
    versions between which pickles do not cross; the broker refused the connection."""


class ClusterShutdown(MpqueueError):
    """The cluster shut down before the job could run."""


class JobTimeout(MpqueueError, TimeoutError):
    """A job ran past its ``timeout`` on its last allowed attempt; the worker killed it."""

    def __init__(self, message: str, *, timeout: float | None = None, attempts: int = 0,
                 pid: int | None = None, host: str | None = None):
        super().__init__(message)
        self.timeout = timeout
        self.attempts = attempts
        self.pid = pid
        self.host = host

    def __reduce__(self):
        return _rebuild, (JobTimeout, str(self), self.__dict__)


class WorkerLost(MpqueueError):
    """The process running a job died (segfault, ``os._exit``, OOM kill) on its last attempt."""

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None,
                 signal: str | None = None, attempts: int = 0, host: str | None = None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.attempts = attempts
        self.host = host

    def __reduce__(self):
        return _rebuild, (WorkerLost, str(self), self.__dict__)


class PayloadTooLarge(MpqueueError, ValueError):
    """A job's pickled function and arguments, or its pickled result, are over
    the cluster's ``max_payload``: that job fails, and nothing else."""

    def __init__(self, message: str, *, size: int = 0, limit: int = 0):
        super().__init__(message)
        self.size = size
        self.limit = limit

    def __reduce__(self):
        return _rebuild, (PayloadTooLarge, str(self), self.__dict__)


class EnvironmentMismatch(MpqueueError):
    """A job needs an installed package at the client's version, and its worker
    has another (or none). ``differences`` holds ``(distribution, client's
    version, worker's version or None)``; ``host`` is the worker's."""

    def __init__(self, message: str, *, differences: list | None = None, host: str | None = None):
        super().__init__(message)
        self.differences = differences or []
        self.host = host

    def __reduce__(self):
        return _rebuild, (EnvironmentMismatch, str(self), self.__dict__)


def _rebuild(cls, message, state):
    return cls(message, **state)


class RemoteError(MpqueueError):
    """A job raised an exception that could not cross the wire; its text is kept."""

    def __init__(self, type_name: str, message: str, traceback: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return RemoteError, (self.type_name, self.message, self.traceback)


class RemoteTraceback(Exception):
    """Holds a remote traceback's text, chained as ``__cause__`` of a job's exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb

"""mpqueue: a task queue that spreads CPU-bound Python work over the cores of
one machine or a handful of machines, with nothing but ``pip install``.

    from mpqueue import Client, Pool
    with Client("HOST:PORT") as client:          # or Client() for a private local cluster
        results = list(client.map(fn, items))

    with Pool(address="HOST:PORT") as pool:     # multiprocessing.Pool's API
        results = pool.map(fn, items)
"""

__version__ = "0.1.0"

from .errors import (
    AuthenticationError,
    BrokerUnavailable,
    ClusterShutdown,
    ConfigError,
    EnvironmentMismatch,
    JobTimeout,
    MpqueueError,
    PayloadTooLarge,
    RemoteError,
    VersionMismatch,
    WorkerLost,
)

__all__ = ["Client", "Pool", "MpqueueError", "ConfigError", "BrokerUnavailable",
           "AuthenticationError", "VersionMismatch", "ClusterShutdown", "JobTimeout", "WorkerLost",
           "PayloadTooLarge", "EnvironmentMismatch", "RemoteError", "shared", "__version__"]


def __getattr__(name: str):
    # Client and Pool are imported on first use: the processes that need
    # neither (a worker's job processes, and the forkserver that starts
    # them) start that much faster.
    if name == "Client":
        from .client import Client
        return Client
    if name == "Pool":
        from .multiprocessing import Pool
        return Pool
    if name == "shared":
        import importlib
        return importlib.import_module(".shared", __name__)
    raise AttributeError(f"module 'mpqueue' has no attribute {name!r}")

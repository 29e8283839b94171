"""mpqueue: a task queue that spreads CPU-bound Python work over the cores of
one machine or a handful of machines, with nothing but ``pip install``.

    from mpqueue import Client, Pool
    with Client("HOST:PORT") as client:          # or Client() for a private local cluster
        results = list(client.map(fn, items))

    with Pool(address="HOST:PORT") as pool:     # multiprocessing.Pool's API
        results = pool.map(fn, items)
"""

__version__ = "0.1.0"

from .client import Client
from .errors import (AuthenticationError, BrokerUnavailable, ClusterShutdown, ConfigError,
                     JobTimeout, MpqueueError, RemoteError, VersionMismatch, WorkerLost)
from .multiprocessing import Pool

__all__ = ["Client", "Pool", "MpqueueError", "ConfigError", "BrokerUnavailable",
           "AuthenticationError", "VersionMismatch", "ClusterShutdown", "JobTimeout", "WorkerLost",
           "RemoteError", "__version__"]

"""The cluster in numbers: finished jobs per second, and the Prometheus text
of a status.

::

    broker main thread ──tick, once a second──▶ Throughput.sample(now, finished)
    status (under the broker's lock) ──▶ Throughput.rates(now, finished) ──▶ "throughput"
    dashboard thread ──a status, lock released──▶ prometheus(status) ──▶ /metrics

`Throughput` keeps one reading of the finished-jobs total per tick, the last
ten minutes of them, so a rate over any window up to that is two look-ups:
nothing is counted per job beyond the totals the broker keeps anyway
(`history.Counters`). `prometheus` only formats a status the broker has
already made; it runs in the dashboard's thread with no lock held.
"""

from __future__ import annotations

import bisect
from collections import deque

#: How far back the throughput goes, in seconds: the dashboard's chart.
SPAN = 600
#: The chart's bars: jobs finished per second over each this many seconds.
STEP = 10


class Throughput:
    """Readings of (monotonic time, jobs finished so far), one per tick, the
    last `SPAN` seconds of them. Before the first, every rate is 0."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()
        self._totals: deque[int] = deque()

    def sample(self, now: float, finished: int) -> None:
        """Take a reading (the broker's tick, about once a second)."""
        self._times.append(now)
        self._totals.append(finished)
        while self._times[0] < now - SPAN - STEP:
            self._times.popleft()
            self._totals.popleft()

    def _at(self, when: float, now: float, finished: int) -> tuple[float, int]:
        """The last reading at or before ``when``: the first one if none is,
        the one given (``now``, ``finished``) if there is none at all."""
        if not self._times:
            return now, finished
        i = max(0, bisect.bisect_right(self._times, when) - 1)
        return self._times[i], self._totals[i]

    def rate(self, now: float, finished: int, window: float) -> float:
        """Jobs finished per second over the last ``window`` seconds (less
        if the broker is younger), ``finished`` being the total now."""
        then, total = self._at(now - window, now, finished)
        return (finished - total) / (now - then) if now > then else 0.0

    def rates(self, now: float, finished: int) -> dict:
        """The ``throughput`` of a status: per second over the last 10 s and
        1 min, and ``per_step``, the rate over each `STEP` s of the last
        `SPAN` s, oldest first (0 before the broker started)."""
        edges = [self._at(now - SPAN + k * STEP, now, finished) for k in range(SPAN // STEP)] + [(now, finished)]
        per_step = [round((b[1] - a[1]) / STEP, 2) for a, b in zip(edges, edges[1:])]
        return {"10s": round(self.rate(now, finished, 10), 2), "1m": round(self.rate(now, finished, 60), 2),
                "step": STEP, "per_step": per_step}


#: (name, type, help, how to read it from a status).
_FAMILIES = [
    ("mpqueue_jobs_submitted_total", "counter", "Jobs the broker took.", lambda s: s["counters"]["submitted"]),
    ("mpqueue_jobs_done_total", "counter", "Jobs that returned a result.", lambda s: s["counters"]["done"]),
    ("mpqueue_jobs_failed_total", "counter", "Jobs that ended without a result (raised, timed out, lost, shut down).",
     lambda s: s["counters"]["failed"]),
    ("mpqueue_jobs_cancelled_total", "counter", "Jobs withdrawn by their client.",
     lambda s: s["counters"]["cancelled"]),
    ("mpqueue_jobs_retried_total", "counter", "Failed attempts whose job was queued to run again.",
     lambda s: s["counters"]["retried"]),
    ("mpqueue_jobs_lost_total", "counter", "Attempts whose process died or whose worker was lost.",
     lambda s: s["counters"]["lost"]),
    ("mpqueue_jobs_timed_out_total", "counter", "Attempts killed at their timeout.",
     lambda s: s["counters"]["timed_out"]),
    ("mpqueue_jobs_queued", "gauge", "Jobs not started: queued, backing off, or held by a worker.",
     lambda s: s["queued"]),
    ("mpqueue_jobs_running", "gauge", "Jobs running in a worker's child now.", lambda s: s["running"]),
    ("mpqueue_workers", "gauge", "Workers registered.", lambda s: len(s["workers"])),
    ("mpqueue_clients", "gauge", "Clients connected, or gone for less than their grace.", lambda s: s["clients"]),
]

#: Per worker: (name, help, its field in the status).
_PER_WORKER = [
    ("mpqueue_worker_procs", "Processes of the worker's pool.", "procs"),
    ("mpqueue_worker_procs_busy", "Processes of the worker running a job now.", "running"),
    ("mpqueue_worker_cpu_percent", "CPU of the worker's children, percent of one core, as of its last heartbeat.",
     "cpu"),
    ("mpqueue_worker_rss_bytes", "Resident memory of the worker's children, as of its last heartbeat.", "rss"),
]


def prometheus(status: dict) -> str:
    """A `BrokerState.status` in Prometheus' text format (version 0.0.4)."""
    lines = []
    for name, kind, text, read in _FAMILIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {read(status)}"]
    for name, text, field in _PER_WORKER:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        for w in status["workers"]:
            if w.get(field) is not None:
                lines.append(f'{name}{{worker="{w["id"]}",host="{_label(w["host"])}"}} {w[field]}')
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """A label value, escaped as the text format asks."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

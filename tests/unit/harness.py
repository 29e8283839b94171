"""Helpers of the unit tier: a `BrokerState` with a fake clock, and calls on
behalf of one client and its workers."""

from __future__ import annotations

import random

from mpqueue.config import Settings
from mpqueue.history import KEEP
from mpqueue.protocol import ClientHello, Options, Outcome, Status, Submission, WorkerHello, WorkerWelcome
from mpqueue.state import PARKED, BrokerState

SETTINGS = Settings(heartbeat_timeout=10.0, wait_slice=2.0, client_grace=5.0, result_ttl=100.0,
                    retry_delay_cap=30.0, drain_timeout=30.0)


#: The wall clock's time at the fake clock's 0: history times are ``EPOCH + now``.
EPOCH = 1_700_000_000.0


class FixedJitter(random.Random):
    """Backoff jitter that is always ``factor`` (1.0: none)."""

    def __init__(self, factor: float = 1.0):
        super().__init__(0)
        self.factor = factor

    def uniform(self, a: float, b: float) -> float:
        return self.factor


class Harness:
    """A `BrokerState` with helpers that speak for one client and its workers."""

    def __init__(self, durable: bool = False, settings: Settings = SETTINGS, history: int = KEEP):
        self.closing = False
        self.jitter = FixedJitter()
        self.state = BrokerState(settings, broker_id="b1", first_id=100, durable=durable,
                                 closing=lambda: self.closing, rng=self.jitter, history=history, epoch=EPOCH)
        self.seq = 0
        self.effects = self.state.settle()

    def settle(self):
        self.effects = self.state.settle()
        return self.effects

    def client(self, session: str = "c", now: float = 0.0) -> None:
        self.state.connected(session)
        self.state.register(session, ClientHello(1, "test"), None, now)
        self.settle()

    def worker(self, session: str = "w", now: float = 0.0, **info) -> WorkerWelcome:
        self.state.connected(session)
        answer = self.state.register(session, WorkerHello(**{"host": "h", "pid": 7, "procs": 1, "versions": {},
                                                            **info}), "addr", now)
        self.settle()
        return answer

    def submit(self, *options: Options, now: float = 0.0, session: str = "c") -> list[int]:
        """Submit one job per Options; returns their seqs."""
        subs = []
        for opts in options:
            self.seq += 1
            subs.append(Submission(self.seq, b"fn", b"args%d" % self.seq, False, opts))
        self.state.submit(session, subs, {b"fn": b"blob"}, now)
        self.settle()
        return [s.seq for s in subs]

    def fetch(self, session: str = "w", n: int = 10, now: float = 0.0, wait: float = 0.0, reply=None):
        result = self.state.fetch(session, reply, n, wait, now)
        self.settle()
        return result if result is PARKED else result[0]

    def report(self, task_id: int, status: Status = Status.OK, payload=b"r", retryable: bool = False,
               session: str = "w", now: float = 0.0, running=(0, [])) -> None:
        self.state.report(session, [Outcome(task_id, status, payload, retryable)], running, now)
        self.settle()

    def collect(self, ack: int = 0, now: float = 0.0, wait: float = 0.0, session: str = "c", reply=None,
                urgent: bool = False):
        result = self.state.collect(session, reply, ack, wait, now, urgent)
        self.settle()
        return result

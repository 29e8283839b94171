"""Cancels, results and their acknowledgements, sessions and rejoining
workers, and what a durable broker writes: the rules, with a fake clock."""

from __future__ import annotations

from mpqueue.protocol import ClientHello, ClientWelcome, Delivery, Options, Status
from mpqueue.state import NOTHING_YET, PARKED, PendingCancel

from .harness import SETTINGS, Harness


def test_cancel_of_a_queued_job_is_immediate_and_asked_again_says_so(h):
    h.worker()
    (seq,) = h.submit(Options())
    assert h.state.cancel("c", [seq], False, 0.0) == [True]
    assert h.fetch() == []
    assert h.state.cancel("c", [seq], False, 0.0) == [True]
    assert h.state.cancel("c", [99], False, 0.0) == [False]          # never heard of


def test_cancel_of_a_leased_job_asks_its_worker_and_waits_for_the_answer(h):
    h.worker()
    (seq,) = h.submit(Options())
    worker = h.state.worker("w")
    assert h.state.withdrawals("w", worker) is NOTHING_YET
    (task,) = h.fetch()
    pending = h.state.cancel("c", [seq], False, 0.0)
    assert isinstance(pending, PendingCancel) and h.state.out.wake_control
    assert h.state.withdrawals("w", worker) == [(task.id, False)]
    assert h.state.awaiting(pending)
    h.state.answered({task.id: True})
    assert not h.state.awaiting(pending)
    assert h.state.conclude(pending, 0.0) == [True]
    h.settle()
    h.report(task.id, Status.CANCELLED, b"")    # too late to matter: it is forgotten
    assert h.collect() == [] and h.state.status(0.0, 0.0)["queued"] == 0


def test_a_started_job_is_cancelled_only_with_force(h):
    h.worker()
    (seq,) = h.submit(Options())
    (task,) = h.fetch()
    h.state.report("w", [], (1, [task.id]), 0.0)        # it runs now
    assert h.state.cancel("c", [seq], False, 0.0) == [False]
    pending = h.state.cancel("c", [seq], True, 0.0)
    assert h.state.withdrawals("w", h.state.worker("w")) == [(task.id, True)]
    h.state.answered({task.id: True})
    assert h.state.conclude(pending, 0.0) == [True]


def test_a_job_its_worker_did_not_withdraw_is_not_cancelled(h):
    h.worker()
    (seq,) = h.submit(Options())
    (task,) = h.fetch()
    pending = h.state.cancel("c", [seq], False, 0.0)
    assert h.state.cancel("c", [seq], False, 0.0) == [False]         # one cancel of it at a time
    h.state.answered({task.id: False})
    assert h.state.conclude(pending, 0.0) == [False]
    h.settle()
    h.report(task.id, payload=b"done")
    assert [d.payload for _, d in h.collect()] == [b"done"]


def test_a_cancel_waiting_on_a_worker_that_is_lost_withdraws_the_job(h):
    h.worker()
    (seq,) = h.submit(Options())
    h.fetch()
    pending = h.state.cancel("c", [seq], False, 0.0)
    h.state.tick(SETTINGS.heartbeat_timeout + 1)
    assert h.state.out.wake_cancels and not h.state.awaiting(pending)
    assert h.state.conclude(pending, 0.0) == [True]
    h.settle()
    assert h.state.status(20.0, 0.0)["queued"] == 0


def test_a_cancel_wakes_the_clients_parked_collect(h):
    (seq,) = h.submit(Options())
    assert h.collect(wait=5.0, reply="collect-call") is PARKED
    h.state.cancel("c", [seq], False, 0.0)
    assert h.settle().answers == [("collect-call", ("#RETURN", []))]


def test_results_stay_until_acknowledged(h):
    h.worker()
    h.submit(Options(), Options())
    first, second = h.fetch()
    h.report(first.id, payload=b"1")
    assert [(n, d.payload) for n, d in h.collect(ack=0)] == [(1, b"1")]
    assert [n for n, _ in h.collect(ack=0)] == [1]                  # the reply was lost: again
    h.report(second.id, payload=b"2")
    assert [(n, d.payload) for n, d in h.collect(ack=1)] == [(2, b"2")]
    assert h.collect(ack=2) == []


def test_a_parked_collect_is_answered_by_the_report_and_urgent_ones_first(h):
    h.worker()
    h.submit(Options(), Options())
    first, second = h.fetch()
    assert h.collect(wait=5.0, reply="thread") is PARKED
    assert h.collect(wait=5.0, reply="waiter", urgent=True) is PARKED
    h.report(first.id)
    assert [reply for reply, _ in h.effects.answers] == ["waiter"]
    h.report(second.id)
    assert [reply for reply, _ in h.effects.answers] == ["thread"]


def test_a_collect_is_answered_empty_when_its_wait_runs_out(h):
    assert h.collect(wait=60.0, reply="r", now=10.0) is PARKED
    assert h.state.next_deadline() == 10.0 + SETTINGS.wait_slice
    h.state.expire(10.0 + SETTINGS.wait_slice)
    assert h.settle().answers == [("r", ("#RETURN", []))]


def test_results_expire_after_their_ttl(durable):
    durable.worker()
    durable.submit(Options())
    (task,) = durable.fetch()
    durable.report(task.id, now=1.0)
    durable.state.report("w", [], (0, []), SETTINGS.result_ttl)     # the worker stays alive
    durable.state.tick(SETTINGS.result_ttl + 0.5)
    assert durable.settle().journal == []
    durable.state.report("w", [], (0, []), SETTINGS.result_ttl + 1.5)
    durable.state.tick(SETTINGS.result_ttl + 1.5)
    assert durable.settle().journal == [("expired", ("c", [1]))]
    assert durable.collect(now=SETTINGS.result_ttl + 2) == []


def test_a_client_gone_past_its_grace_is_forgotten_without_a_journal(h):
    h.state.connection_closed("c", None, 1.0)
    h.state.tick(1.0 + SETTINGS.client_grace)
    assert h.state.status(0.0, 0.0)["clients"] == 1
    h.state.tick(1.1 + SETTINGS.client_grace)
    assert h.state.status(0.0, 0.0)["clients"] == 0
    assert h.state.register("c", ClientHello(1, "test", resume=True), None, 10.0) == ClientWelcome(False)


def test_a_rejoining_worker_keeps_its_running_and_finished_jobs_and_gives_back_the_rest(h):
    h.worker("w", broker_id="b1")
    h.submit(Options(), Options(), Options())
    running, finished, prefetched = h.fetch()
    h.state.report("w", [], (1, [running.id, finished.id]), 0.0)
    # Its connection broke and it came back (the broker did not restart).
    answer = h.worker("w", now=1.0, broker_id="b1", running=[running.id], finished=[finished.id])
    assert answer.new is False and answer.unknown == []
    h.worker("w2", now=1.0)
    (again,) = h.fetch("w2", now=1.0)
    assert again.id == prefetched.id and again.attempt == 1     # charged nothing
    h.report(finished.id, payload=b"kept", session="w", now=1.0, running=(1, [running.id]))
    assert [d.payload for _, d in h.collect(now=1.0)] == [b"kept"]
    assert h.state.status(1.0, 0.0)["running"] == 1


def test_a_restarted_broker_leaves_a_rejoining_workers_jobs_with_it():
    h = Harness(durable=True)
    stored = {"id": "journal-id", "next_id": 500, "functions": {b"fn": b"blob"},
              "clients": {"c": (2, 0)},
              "jobs": [(300, "c", 1, b"fn", b"a", False, Options(), 1, 0),
                       (301, "c", 2, b"fn", b"a", False, Options(), 1, 0)],
              "results": []}
    assert h.state.restore(stored, 1000.0, 5000.0) == (2, 0, 1)
    h.state.connected("c")
    answer = h.worker("w", now=1000.0, broker_id="journal-id", running=[300, 999])
    assert answer.unknown == [999] and not answer.new
    assert [(t.id, t.attempt) for t in h.fetch(now=1000.0)] == [(301, 2)]
    h.report(300, payload=b"ran once", now=1000.0)
    assert [(d.seq, d.attempts) for _, d in h.collect(now=1000.0)] == [(1, 1)]
    assert h.worker("w9", broker_id="another").new is True


def test_restored_results_keep_their_age_for_the_ttl():
    h = Harness()
    delivery = Delivery(1, Status.OK, b"r", 1)
    stored = {"id": "j", "next_id": 1, "functions": {}, "clients": {"c": (1, 1)}, "jobs": [],
              "results": [("c", 1, delivery, 5000.0 - 60)]}       # a minute old
    h.state.restore(stored, 1000.0, 5000.0)
    h.state.connected("c")
    h.state.tick(1000.0 + SETTINGS.result_ttl - 61)
    assert h.state.status(0.0, 0.0)["results"] == 1
    h.state.tick(1000.0 + SETTINGS.result_ttl - 59)
    assert h.state.status(0.0, 0.0)["results"] == 0


def test_a_durable_state_says_what_to_write(durable):
    durable.worker()
    durable.submit(Options())
    ((name, args),) = durable.effects.journal
    assert name == "submitted" and args[:3] == ("c", 1, 101)
    (task,) = durable.fetch()
    assert durable.effects.journal == [("attempts", ([(1, 0, task.id)],))]
    durable.report(task.id, payload=b"r")
    names = [name for name, _ in durable.effects.journal]
    assert names == ["forgotten", "unused", "result", "history", "attempts"]
    durable.collect(ack=1)
    assert durable.effects.journal == [("acknowledged", ("c", 1))]


def test_nothing_is_written_without_a_journal(h):
    h.worker()
    h.submit(Options())
    (task,) = h.fetch()
    h.report(task.id)
    assert h.effects.journal == []


def test_a_goodbye_drops_the_clients_jobs_and_asks_workers_for_unstarted_ones(h):
    h.worker()
    h.submit(Options(), Options(), Options())
    started, held, _ = h.fetch(n=2) + [None]
    h.state.report("w", [], (1, [started.id]), 0.0)
    h.state.goodbye("c", 0.0)
    assert h.state.out.wake_control
    assert h.state.withdrawals("w", h.state.worker("w")) == [(held.id, False)]
    h.settle()
    h.report(started.id, running=(2, []))        # it finishes; nobody to tell
    assert h.state.status(0.0, 0.0) | {"workers": None} == {
        "workers": None, "queued": 0, "running": 0, "done": 1, "failed": 0, "clients": 0, "results": 0,
        "shutting_down": False, "shared": [], "history": 3, "by_priority": {},
        "counters": {"submitted": 3, "done": 1, "failed": 0, "cancelled": 2, "retried": 0, "lost": 0,
                     "timed_out": 0},
        "throughput": {"10s": 0.0, "1m": 0.0, "step": 10, "per_step": [0.0] * 60}}


def test_a_disconnect_is_a_loss_only_on_the_last_connection(h):
    h.worker()
    h.state.connected("w")          # a second connection of the same worker
    h.submit(Options())
    h.fetch()
    h.state.connection_closed("w", None, 1.0)
    assert len(h.state.status(1.0, 0.0)["workers"]) == 1
    h.state.connection_closed("w", None, 1.0)
    assert h.state.status(1.0, 0.0)["workers"] == [] and h.state.status(1.0, 0.0)["queued"] == 1

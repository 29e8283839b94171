"""The numbers of `mpqueue status --watch`, the dashboard and /metrics: the
throughput over time, the queue by priority, the workers' load, and the
Prometheus text of a status."""

from __future__ import annotations

import pytest

from mpqueue.metrics import SPAN, STEP, Throughput, prometheus
from mpqueue.protocol import Options, Status


def test_throughput_is_jobs_finished_per_second_over_each_window():
    rate = Throughput()
    assert rate.rates(5.0, 0)["10s"] == 0.0       # no reading yet
    for second in range(121):                      # 2 jobs a second for a minute, then 10 a second
        rate.sample(float(second), 2 * min(second, 60) + 10 * max(0, second - 60))
    finished = 2 * 60 + 10 * 60
    rates = rate.rates(120.0, finished)
    assert (rates["10s"], rates["1m"]) == (10.0, 10.0)
    assert rate.rate(120.0, finished, 120) == 6.0
    assert len(rates["per_step"]) == SPAN // STEP and rates["step"] == STEP
    assert rates["per_step"][-6:] == [10.0] * 6 and rates["per_step"][-12:-6] == [2.0] * 6
    assert rates["per_step"][0] == 0.0             # before the broker started


def test_throughput_over_a_window_longer_than_the_broker_has_run_is_over_its_life():
    rate = Throughput()
    rate.sample(0.0, 0)
    rate.sample(4.0, 20)
    assert rate.rates(4.0, 20)["1m"] == 5.0


def test_throughput_keeps_only_what_the_chart_shows():
    rate = Throughput()
    for second in range(3 * SPAN):
        rate.sample(float(second), second)
    assert len(rate._times) <= SPAN + STEP + 1


def test_status_has_the_throughput_from_the_ticks(h):
    h.worker()
    h.state.tick(0.0)
    h.submit(*[Options()] * 4)
    for task in h.fetch(n=4):
        h.report(task.id, now=2.0)
    h.state.tick(2.0)
    assert h.state.status(2.0, 0.0)["throughput"]["10s"] == 2.0


def test_the_queue_by_priority_counts_jobs_waiting_at_the_broker(h):
    h.worker()
    h.submit(Options(priority=5), Options(), Options(), Options(priority=-1))
    assert h.state.status(0.0, 0.0)["by_priority"] == {"5": 1, "0": 2, "-1": 1}
    (task,) = h.fetch(n=1)                         # the highest first
    assert h.state.status(0.0, 0.0)["by_priority"] == {"0": 2, "-1": 1}
    h.report(task.id, Status.LOST, retryable=True)     # back in the queue
    assert h.state.status(0.0, 0.0)["by_priority"] == {"5": 1, "0": 2, "-1": 1}
    h.state.goodbye("c", 0.0)
    assert h.state.status(0.0, 0.0)["by_priority"] == {}


def test_a_workers_load_is_what_its_last_heartbeat_said(h):
    h.worker()
    (worker,) = h.state.status(0.0, 0.0)["workers"]
    assert (worker["cpu"], worker["rss"]) == (None, None)      # not reported yet
    h.state.report("w", [], (0, []), 1.0, None, (187.5, 300 << 20))
    h.state.report("w", [], (0, []), 1.5)                     # a report between heartbeats: no reading
    (worker,) = h.state.status(1.5, 0.0)["workers"]
    assert (worker["cpu"], worker["rss"]) == (187.5, 300 << 20)


def test_prometheus_text_parses_with_help_and_type_for_each_family(h):
    parser = pytest.importorskip("prometheus_client.parser")
    h.worker(host='odd "host"', procs=3)
    h.submit(Options(), Options())
    (task, _) = h.fetch(n=2)
    h.state.report("w", [], (1, [task.id]), 0.5, None, (99.0, 1 << 20))
    families = {f.name: f for f in parser.text_string_to_metric_families(prometheus(h.state.status(1.0, 0.0)))}
    assert families["mpqueue_jobs_submitted"].type == "counter"
    assert families["mpqueue_jobs_submitted"].samples[0].value == 2
    assert families["mpqueue_jobs_running"].samples[0].value == 1
    assert families["mpqueue_jobs_queued"].samples[0].value == 1
    (busy,) = families["mpqueue_worker_procs_busy"].samples
    assert busy.labels == {"worker": "w", "host": 'odd "host"'} and busy.value == 1
    assert families["mpqueue_worker_cpu_percent"].samples[0].value == 99.0
    assert all(f.documentation for f in families.values())

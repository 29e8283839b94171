"""What the dashboard costs the job path: W1 with and without a page open and
a Prometheus-like scraper.

Run from the repository root::

    python benchmarks/dashboard.py
    python benchmarks/dashboard.py --screenshot docs/dashboard.png

One cluster as bench.py makes it (a broker subprocess, here with
``--dashboard 0``, and one worker of 2 procs), and bench.py's W1 (10,000
no-op jobs, one ``submit`` each, then all results) run ``--reps`` times in
each of two conditions, alternating which goes first:

bare        nothing open on the dashboard (the browser shows about:blank);
watched     the page open in headless chromium (Debian's, driven by
            Playwright; it fetches /api/status and /api/jobs every second)
            and a thread GETting /metrics every second with the token.

For each: the median jobs/s, and the broker's CPU time (user + system, from
psutil) per job, which the other load on a shared machine moves less than
the wall clock. With ``--screenshot PATH``, after the measurements, the page
is photographed while 3,000 short jobs and a few failing ones run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
from bench import Cluster, MpqueueRunner, w1_throughput

import mpqueue
from mpqueue.dashboard import token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def dashboard_url(cluster: Cluster) -> str:
    """The page's URL: the broker's other listening port, and the token of its key."""
    port = int(cluster.address.rsplit(":", 1)[1])
    listening = {c.laddr.port for c in psutil.Process(cluster.broker.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    (other,) = listening - {port}
    return f"http://127.0.0.1:{other}/?token={token(cluster.authkey.encode())}"


class Scraper(threading.Thread):
    """GET /metrics every second while ``on`` is set, as Prometheus would."""

    def __init__(self, url: str):
        super().__init__(daemon=True, name="scraper")
        base, key = url.split("/?token=")
        self.request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {key}"})
        self.on = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while True:
            self.on.wait()
            with urllib.request.urlopen(self.request, timeout=10) as answer:
                answer.read()
            self.scrapes += 1
            time.sleep(1)


def slow(i: int) -> int:
    """A job of 5 ms; every 500th raises, for the page's failures."""
    time.sleep(0.005)
    if i % 500 == 499:
        raise ValueError(f"item {i} is odd")
    return i


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--screenshot", metavar="PATH", help="photograph the page under load here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    figures: dict[str, list[tuple[float, float]]] = {"bare": [], "watched": []}
    with tempfile.TemporaryDirectory() as logdir, sync_playwright() as playwright:
        cluster = Cluster(logdir, broker_args=("--dashboard", "0"))
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            cluster.start()
            cluster.wait_for_worker()
            url = dashboard_url(cluster)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            scraper = Scraper(url)
            scraper.start()
            broker = psutil.Process(cluster.broker.pid)
            with mpqueue.Client(cluster.address, authkey=cluster.authkey) as client:
                runner = MpqueueRunner(client, cluster)
                w1_throughput(runner, {"w1_jobs": 2_000})       # warm-up, untimed
                for rep in range(args.reps):
                    for condition in (("bare", "watched") if rep % 2 == 0 else ("watched", "bare")):
                        if condition == "watched":
                            page.goto(url)
                            page.wait_for_selector("tr[data-worker]")
                            scraper.on.set()
                        else:
                            scraper.on.clear()
                            page.goto("about:blank")
                        time.sleep(2)       # the page polls, the scraper scrapes: settled
                        before = sum(broker.cpu_times()[:2])
                        rate = w1_throughput(runner, {"w1_jobs": args.jobs})["jobs_per_s"]
                        cpu = (sum(broker.cpu_times()[:2]) - before) / args.jobs
                        figures[condition].append((rate, cpu))
                        print(f"rep {rep + 1} {condition:8} {rate:8,.0f} jobs/s  broker CPU {cpu * 1e6:.0f} us/job",
                              file=sys.stderr)
                if args.screenshot:
                    page.goto(url)
                    running = threading.Thread(target=lambda: [f.exception() for f in
                                                               [client.submit(slow, i) for i in range(3_000)]])
                    running.start()
                    time.sleep(6)
                    page.screenshot(path=args.screenshot, full_page=True)
                    running.join()
            print(f"scrapes of /metrics: {scraper.scrapes}", file=sys.stderr)
        finally:
            browser.close()
            cluster.stop()
    print(f"W1, {args.jobs:,} no-op jobs, median of {args.reps}:")
    for condition, runs in figures.items():
        rates, cpus = [r for r, _ in runs], [c for _, c in runs]
        print(f"  {condition:8} {statistics.median(rates):8,.0f} jobs/s   broker CPU "
              f"{statistics.median(cpus) * 1e6:5.0f} us/job   (runs: {', '.join(f'{r:,.0f}' for r in rates)})")
    return 1 if cluster.problems else 0


if __name__ == "__main__":
    sys.exit(main())

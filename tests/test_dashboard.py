"""``mpqueue broker --dashboard``: the page in a real headless browser,
/metrics read by Prometheus' own parser, the JSON API, and the token.

The browser is Debian's chromium driven by Playwright's Python package
(nothing is downloaded: `.ci/run` installs chromium with apt-get); without
either, the browser test skips and says which is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import psutil
import pytest

from mpqueue import dashboard

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
#: As the machine's notes ask: headless, and no connection of chromium's own to the outside.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class Board:
    """A broker's dashboard: its URL, and GETs with or without the token."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.token = parts.query.removeprefix("token=")

    def get(self, path: str, token: str | None = "query", bearer: str | None = None) -> tuple[int, str]:
        """(status, body) of ``path``: the token in the query (``token="query"``),
        none (None) or another one; ``bearer``, in an Authorization header."""
        if token == "query":
            token = self.token
        if token is not None:
            path += ("&" if "?" in path else "?") + "token=" + token
        request = urllib.request.Request(self.base + path)
        if bearer is not None:
            request.add_header("Authorization", "Bearer " + bearer)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def json(self, path: str):
        code, body = self.get(path)
        assert code == 200, body
        return json.loads(body)


@pytest.fixture
def board(empty) -> Board:
    """A broker with its dashboard on a port of the OS's choosing."""
    empty.start_broker("--dashboard", "0")
    line = empty.broker.stdout.readline().decode().strip()    # printed with the first: in the buffer already
    assert line.startswith("http://127.0.0.1:") and "/?token=" in line, line
    return Board(line)


def crash(kind: str):
    """A job for each case the counters tell apart."""
    import os
    import time
    if kind == "raise":
        raise ValueError("bad input")
    if kind == "hang":
        time.sleep(30)
    if kind == "exit":
        os._exit(3)
    return kind


def test_metrics_count_what_ran(empty, board):
    prometheus = pytest.importorskip("prometheus_client.parser")
    empty.start_worker(2)
    client = empty.client()
    assert list(client.map(crash, ["ok"] * 20)) == ["ok"] * 20
    futures = [client.options(retries=1).submit(crash, "raise"), client.options(timeout=0.5).submit(crash, "hang"),
               client.submit(crash, "exit")]
    for future in futures:
        assert future.exception(60) is not None
    code, text = board.get("/metrics")
    assert code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in prometheus.text_string_to_metric_families(text) for s in family.samples}
    expected = {"submitted": 23, "done": 20, "failed": 3, "retried": 1 + 2, "lost": 3, "timed_out": 1}
    for name, value in expected.items():
        assert samples[(f"mpqueue_jobs_{name}_total", ())] == value, name
    assert samples[("mpqueue_jobs_queued", ())] == 0 and samples[("mpqueue_jobs_running", ())] == 0
    assert samples[("mpqueue_workers", ())] == 1
    (worker,) = board.json("/api/status")["workers"]
    assert samples[("mpqueue_worker_procs_busy", (("host", worker["host"]), ("worker", worker["id"])))] == 0
    assert "# HELP mpqueue_jobs_done_total " in text and "# TYPE mpqueue_workers gauge" in text


def test_every_path_needs_the_token_and_a_bearer_header_will_do(empty, board):
    for path in ("/", "/metrics", "/api/status", "/api/jobs", "/nothing"):
        assert board.get(path, token=None)[0] == 401, path
        assert board.get(path, token="0" * 32)[0] == 401, path
        assert board.get(path, token=None, bearer="0" * 32)[0] == 401, path
    code, body = board.get("/metrics", token=None, bearer=board.token)
    assert code == 200 and "mpqueue_jobs_submitted_total 0" in body
    assert board.get("/nothing")[0] == 404
    assert board.get("/api/jobs?limit=x")[0] == 400


def test_the_api_answers_what_status_and_jobs_json_say(empty, board):
    empty.start_worker(1)
    client = empty.client()
    assert client.submit(crash, "ok").result(30) == "ok"
    assert client.submit(crash, "raise").exception(30) is not None
    api = board.json("/api/status")
    cli = empty.status()
    assert api.keys() == cli.keys() and api["counters"] == cli["counters"]
    jobs = json.loads(empty.run("jobs", empty.address, "--json").stdout)
    time.sleep(0.6)     # past the snapshot the status above took
    assert board.json("/api/jobs") == jobs
    (failed,) = board.json("/api/jobs?failed=1")
    assert failed["state"] == "failed" and "ValueError: bad input" in failed["attempts"][-1]["traceback"]
    assert board.json(f"/api/jobs?id={failed['id']}") == [failed]


def test_the_dashboard_follows_the_brokers_rule_off_loopback(empty, tmp_path):
    env = {**os.environ, "MPQUEUE_AUTHKEY": ""}
    result = empty.run("broker", "--host", "0.0.0.0", "--port", "0", "--dashboard", "0", env=env)
    assert result.returncode != 0 and "refusing to listen on 0.0.0.0" in result.stderr


def browser_or_skip():
    """Playwright's sync API and the system's chromium, or a skip that says what is missing."""
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no playwright: pip install -e '.[test]'")
    return sync_playwright


def test_the_page_shows_the_cluster_live_in_a_browser(empty, board, tmp_path):
    sync_playwright = browser_or_skip()
    empty.start_worker(2)
    client = empty.client()
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(board.url)
            page.wait_for_selector("tr[data-worker]", timeout=15_000)
            assert page.inner_text("[data-name=done] b") == "0"
            page.evaluate("window.notReloaded = true")
            # A map the page sees as it runs: jobs long enough for busy procs to show.
            assert list(client.map(crash, ["ok"] * 30)) == ["ok"] * 30
            assert client.submit(crash, "raise").exception(30) is not None
            page.wait_for_function("document.querySelector('[data-name=done] b').textContent === '30'",
                                   timeout=15_000)
            page.wait_for_selector("#failures details summary", timeout=15_000)
            assert page.evaluate("window.notReloaded") is True
            row = page.inner_text("tr[data-worker] td:nth-child(7)")   # the worker's done
            assert row == "30"
            assert "raised ValueError: bad input" in page.inner_text("#failures")
            assert page.locator("#chart svg rect").count() == 60
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors


def test_silent_connections_take_neither_the_brokers_threads_nor_its_jobs(empty, board):
    """Anyone who reaches the port may connect: connections that say nothing
    are capped and timed out, and the broker serves its workers meanwhile."""
    empty.start_worker(1)
    client = empty.client()
    assert client.submit(abs, -4).result(30) == 4
    host, port = urlsplit(board.url).netloc.rsplit(":", 1)
    before = psutil.Process(empty.broker.pid).num_threads()
    silent = [socket.create_connection((host, int(port))) for _ in range(dashboard.MAX_CONNECTIONS + 8)]
    try:
        time.sleep(1)
        threads = psutil.Process(empty.broker.pid).num_threads()
        assert threads <= before + dashboard.MAX_CONNECTIONS + 4, (before, threads)   # a few of its clients
        assert client.submit(abs, -5).result(30) == 5
        for s in silent[dashboard.MAX_CONNECTIONS:]:      # the ones past the cap were closed at once
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        for s in silent:
            s.close()

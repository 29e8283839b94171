"""The command line as a user types it, and authentication."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import logs
from mpqueue import AuthenticationError, BrokerUnavailable, Client

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [[], ["broker"], ["worker"], ["status"], ["jobs"], ["shutdown"], ["demo"]])
def test_every_command_has_useful_help(empty, command):
    result = empty.run(*command, "--help")
    assert result.returncode == 0
    assert "Usage: mpqueue" in result.stdout
    assert len(result.stdout.splitlines()) > 5
    if command in (["worker"], ["status"], ["jobs"], ["shutdown"]):
        # Where the address and the key come from, and the defaults.
        assert "$MPQUEUE_ADDRESS" in result.stdout and "127.0.0.1:5555" in result.stdout
        assert "$MPQUEUE_AUTHKEY" in result.stdout and "authkey" in result.stdout
    if command == ["worker"]:
        assert "sys.path" in result.stdout and "30 s" in result.stdout


@pytest.mark.parametrize("script", ["broker.py", "worker.py"])
def test_top_level_scripts_are_the_commands(empty, script):
    ours = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
    theirs = empty.run(script[:-3], "--help")
    assert ours.returncode == 0
    assert ours.stdout.split("\n", 1)[1] == theirs.stdout.split("\n", 1)[1]


def test_status_shows_workers_as_table_and_json(cluster):
    cluster.start_worker(2)
    table = cluster.run("status", cluster.address)
    assert table.returncode == 0
    assert "HOST" in table.stdout and socket.gethostname()[:11] in table.stdout
    # Narrow by default: a worker's row fits an 80-column terminal.
    header, row = table.stdout.splitlines()[1:]
    assert header.split() == ["WORKER", "HOST", "ADDRESS", "RUN", "QUEUED", "DONE", "FAILED", "LOST", "SEEN"]
    assert max(len(header), len(row)) <= 80 and row.split()[3] == "0/2"
    wide = cluster.run("status", cluster.address, "--wide").stdout.splitlines()[1]
    assert {"PID", "TIMED", "RETRIED", "VERSION"} <= set(wide.split())
    help_text = cluster.run("status", "--help").stdout
    assert "MPQUEUE_ADDRESS" in help_text and "LOST" in help_text and "--wide" in help_text
    info = json.loads(cluster.run("status", cluster.address, "--json").stdout)
    assert {"workers", "queued", "running", "done", "failed"} <= set(info)
    assert set(info["workers"][0]) >= {"id", "host", "pid", "procs", "running", "done", "failed", "last_seen"}
    assert info["workers"][0]["procs"] == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_exits_0_on_sigterm_and_ctrl_c(cluster, sig):
    cluster.broker.send_signal(sig)
    assert cluster.broker.wait(10) == 0


def test_broker_generates_a_private_key_that_local_commands_find(empty, monkeypatch, tmp_path):
    monkeypatch.delenv("MPQUEUE_AUTHKEY")
    address = empty.start_broker()
    key_file = tmp_path / "config" / "mpqueue" / "authkey"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_text().strip()) >= 32
    assert str(key_file) in logs(empty.broker)
    empty.start_worker(1)
    with Client(address) as client:
        assert client.submit(abs, -2).result(10) == 2


def test_no_key_anywhere_is_a_clear_error(empty, monkeypatch):
    monkeypatch.delenv("MPQUEUE_AUTHKEY")
    result = empty.run("status", "127.0.0.1:1")
    assert result.returncode != 0
    assert "no authkey" in result.stderr and "Traceback" not in result.stderr


def test_wrong_key_fails_fast_with_one_line(cluster):
    wrong = {"MPQUEUE_AUTHKEY": "not-the-key"}
    start = time.monotonic()
    result = cluster.run("status", cluster.address, env=wrong)
    assert time.monotonic() - start < 5
    assert result.returncode != 0
    assert "authentication" in result.stderr.lower()
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1

    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="authentication"):
        Client(cluster.address, authkey="not-the-key")
    assert time.monotonic() - start < 5

    worker = cluster.popen(["mpqueue", "worker", cluster.address], "worker", env=wrong)
    assert worker.wait(10) != 0
    assert "authentication" in logs(worker).lower() and "Traceback" not in logs(worker)


def test_worker_waits_for_a_broker_that_is_not_up_yet(empty):
    port = free_port()
    worker = empty.popen(["mpqueue", "worker", f"127.0.0.1:{port}", "--procs", "1"], "worker")
    time.sleep(1)
    assert worker.poll() is None
    assert "waiting for the broker" in logs(worker)
    empty.start_broker("--port", str(port))
    empty.wait_for(lambda s: len(s["workers"]) == 1, "the worker to join")


def test_worker_gives_up_on_a_broker_that_never_comes(empty):
    worker = empty.popen(["mpqueue", "worker", f"127.0.0.1:{free_port()}"], "worker",
                         env={"MPQUEUE_BROKER_WAIT": "1"})
    assert worker.wait(15) == 1
    assert "no broker at" in logs(worker) and "Traceback" not in logs(worker)


def test_client_without_a_broker_fails_fast(empty):
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        Client(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5


def test_commands_reject_a_bad_address(empty):
    result = empty.run("status", "nonsense:port")
    assert result.returncode != 0 and "HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def test_a_broker_on_every_address_says_which_ones_workers_can_use(empty):
    """`listening on 0.0.0.0:P` is no address to give a worker."""
    address = empty.start_broker("--host", "0.0.0.0")
    port = address.rsplit(":", 1)[1]
    said = empty.broker_line.split("listening on 0.0.0.0:" + port, 1)[1].strip()
    assert said.startswith(("(workers reach it at ", "(this host has no address but loopback)")), said
    assert "127.0.0.1" not in said and f":{port}" in said or "no address" in said


def test_address_comes_from_the_environment(cluster, monkeypatch):
    monkeypatch.setenv("MPQUEUE_ADDRESS", cluster.address)
    worker = cluster.popen(["mpqueue", "worker", "--procs", "1"], "worker")
    cluster.wait_for(lambda s: len(s["workers"]) == 1, "the worker to join")
    with Client() as client:       # not a local cluster: the one at $MPQUEUE_ADDRESS
        assert client.submit(os.getpid).result(10) != os.getpid()
        assert client._cluster is None
    assert worker.poll() is None


def test_demo_runs_real_work(empty):
    result = empty.run("demo", "--jobs", "4", "--size", "2000", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "faster" in result.stdout and "4 jobs" in result.stdout


def test_a_misspelt_variable_and_a_key_file_others_can_read_say_so(empty, monkeypatch, tmp_path):
    monkeypatch.delenv("MPQUEUE_AUTHKEY")
    key = tmp_path / "config" / "mpqueue" / "authkey"
    key.parent.mkdir(parents=True)
    key.write_text("a-key\n")
    key.chmod(0o644)
    result = empty.run("status", "127.0.0.1:1", env={"MPQUEUE_ADRESS": "127.0.0.1:1"})
    assert result.returncode == 1
    assert "ignoring MPQUEUE_ADRESS, which is no setting of mpqueue's: did you mean MPQUEUE_ADDRESS?" \
        in result.stderr
    assert f"run `chmod 600 {key}`" in result.stderr and "Traceback" not in result.stderr

"""``mpqueue status --watch`` in a real terminal (a pseudo-terminal of its
own, as at a shell prompt) and in a pipe: it redraws in place, shows the
work as it happens, fits 80 columns, and Ctrl-C gives the terminal back."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
from test_interrupt import Terminal

from helpers import read_line
from mpqueue.watch import ENTER, HOME, LEAVE

pytestmark = pytest.mark.slow


def test_watch_redraws_the_cluster_in_a_terminal_and_ctrl_c_leaves_it_clean(cluster, tmp_path):
    cluster.start_worker(2)
    terminal = Terminal(["-m", "mpqueue", "status", cluster.address, "--watch", "--interval", "0.3"], tmp_path)
    try:
        terminal.wait_for("WORKER", 15)
        terminal.wait_for("procs busy 0/2", 5)
        with cluster.client() as client:
            assert list(client.map(abs, range(-50, 0))) == list(range(50, 0, -1))
        terminal.wait_for("done 50 ", 10)
        frames = terminal.output.count(HOME)
        while terminal.output.count(HOME) < frames + 2:      # redrawn twice more: it goes on
            assert terminal._read(5), terminal.output
        terminal.ctrl_c()
        terminal.wait(10)
    finally:
        terminal.close()
    assert os.WIFEXITED(terminal.status) and os.WEXITSTATUS(terminal.status) == 0, terminal.output
    out = terminal.output
    assert out.startswith(ENTER) and out.rstrip("\n").endswith(LEAVE), repr(out[-200:])
    assert "Traceback" not in out
    frames = out[len(ENTER):].split(HOME)[1:]
    assert len(frames) >= 3, out
    last = frames[-1].removesuffix(LEAVE).splitlines()
    assert all(len(text) <= 80 for frame in frames for text in frame.removesuffix(LEAVE).splitlines())
    header = next(i for i, text in enumerate(last) if text.startswith("WORKER"))
    assert last[header].split() == ["WORKER", "HOST", "PID", "PROCS", "CPU%", "RSS", "DONE", "FAILED", "LOST",
                                    "SEEN"]
    row = last[header + 1].split()
    assert row[3] == "0/2" and row[6] == "50", last     # procs busy/total, done
    assert re.fullmatch(r"\d+", row[4]) and re.fullmatch(r"[\d.]+[KMG]", row[5]), row    # CPU%, RSS: reported


def test_watch_prints_a_line_per_refresh_without_a_terminal(cluster):
    cluster.start_worker(1)
    proc = subprocess.Popen(["mpqueue", "status", cluster.address, "--watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = [read_line(proc.stdout, 10) for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    for text in lines:
        assert re.fullmatch(r"\S+ \S+ workers 1 busy 0/1 queued 0 running 0 done 0 failed 0 lost 0 "
                            r"rate 0\.0/s 0\.0/s\n", text), text

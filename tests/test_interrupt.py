"""Ctrl-C in a client, typed in a real terminal (issue 15).

The user's script runs in a pseudo-terminal of its own, as at a shell
prompt, and the test types Ctrl-C there: the terminal driver sends SIGINT to
the foreground process group, which is everything the script started that
stays in it. The first Ctrl-C withdraws the queued jobs and waits for the
running ones; the second stops those; either way the user reads our line,
then one KeyboardInterrupt, and no process of a private cluster is left.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import kill_tree
from mpqueue.cluster import usable_cpus

pytestmark = pytest.mark.slow

#: The user's script: ``MODE ADDRESS|- MARKS SECONDS JOBS``. Each job leaves
#: a file in MARKS when it starts, then sleeps SECONDS. MODE is ``map`` (in
#: a with block), ``slow-withdraw`` (the same, each withdraw call held 2 s
#: for the test to type in), or ``as_completed`` (no with block).
SCRIPT = '''
import sys, time
from concurrent.futures import as_completed
from pathlib import Path
from mpqueue import Client

mode, address, MARKS, SECONDS, jobs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])

def job(i):
    (MARKS / str(i)).touch()
    time.sleep(SECONDS)
    return i

if mode == "slow-withdraw":
    import mpqueue.client
    withdraw = mpqueue.client.Client._withdraw
    def slow_withdraw(self, futures, force):
        if not all(f.done() for f in futures):
            print("withdrawing", flush=True)
            time.sleep(2)
        return withdraw(self, futures, force)
    mpqueue.client.Client._withdraw = slow_withdraw

client = Client(None if address == "-" else address)
if mode == "as_completed":
    for future in as_completed([client.submit(job, i) for i in range(jobs)]):
        print("result", future.result(), flush=True)
else:
    with client:
        for i in client.map(job, range(jobs)):
            print("result", i, flush=True)
'''

FIRST = re.compile(r"^withdrew (\d+) queued jobs?; (\d+) running will finish; Ctrl-C again to stop them$", re.M)


class Terminal:
    """A process run in a new pseudo-terminal, as its session leader: what
    it writes, Ctrl-C typed at it, and how it ended."""

    def __init__(self, argv: list[str], marks: Path):
        self.marks = marks      # where the script's jobs leave a file as they start
        self.pid, self.fd = pty.fork()
        if self.pid == 0:   # the child: nothing but exec
            try:
                os.execv(sys.executable, [sys.executable, *argv])
            finally:
                os._exit(127)
        self._output = b""
        self.status: int | None = None
        self.ended_at: float | None = None

    def ctrl_c(self) -> float:
        """Type Ctrl-C; returns when."""
        os.write(self.fd, b"\x03")
        return time.monotonic()

    def wait_for(self, text: str, timeout: float) -> None:
        """Read until ``text`` shows in the output."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self._read(deadline - time.monotonic()), f"no {text!r} within {timeout} s:\n{self.output}"

    def wait(self, timeout: float) -> None:
        """Read until the output ends (every process holding the terminal is
        gone), then reap the process."""
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()):
            pass
        while not (reaped := os.waitpid(self.pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline, f"still running after {timeout} s:\n{self.output}"
            time.sleep(0.02)
        self.status = reaped[1]
        self.ended_at = self.ended_at or time.monotonic()

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``: False at the end of the
        output (the process is gone) or once the time is up."""
        if timeout <= 0:
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:     # EIO: the other side closed, the process is gone
            data = b""
        if not data:
            self.ended_at = self.ended_at or time.monotonic()
            return False
        self._output += data
        return True

    @property
    def output(self) -> str:
        """As the user reads it: the terminal's ``^C`` echoes and CRs taken out."""
        # The echo can land between a line's CR and LF: take it out first.
        return self._output.decode(errors="replace").replace("^C", "").replace("\r\n", "\n").replace("\r", "")

    def close(self) -> None:
        if self.status is None:
            kill_tree(self.pid)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def run_script(tmp_path):
    """Start the user's script in a terminal: ``run_script(mode, address, seconds, jobs)``."""
    script = tmp_path / "user.py"
    script.write_text(SCRIPT)
    marks = tmp_path / "ran"
    marks.mkdir()
    terminals: list[Terminal] = []

    def run(mode: str, address: str, seconds: float, jobs: int) -> Terminal:
        terminal = Terminal([str(script), mode, address, str(marks), str(seconds), str(jobs)], marks)
        terminals.append(terminal)
        return terminal
    yield run
    for terminal in terminals:
        terminal.close()


def started(terminal: Terminal) -> int:
    """How many jobs have started so far."""
    return len(list(terminal.marks.iterdir()))


def wait_started(terminal: Terminal, jobs: int) -> None:
    """Wait until ``jobs`` jobs have started (and type Ctrl-C then)."""
    deadline = time.monotonic() + 30
    while started(terminal) < jobs:
        terminal._read(0.05)
        assert terminal.ended_at is None and time.monotonic() < deadline, \
            f"{started(terminal)} of {jobs} jobs started; output:\n{terminal.output}"


def check_ending(terminal: Terminal, ours: list[str]) -> None:
    """The user read ``ours`` (our lines, in order), then one KeyboardInterrupt
    whose traceback names their script and our public call only, and the
    process died of SIGINT, as Python's own KeyboardInterrupt makes it."""
    out = terminal.output
    assert "During handling" not in out and "direct cause" not in out, out
    assert out.count("Traceback (most recent call last):") == 1, out
    before, traceback = out.split("Traceback (most recent call last):\n")
    lines = traceback.splitlines()
    assert lines[-1] == "KeyboardInterrupt", out
    for path in re.findall(r'^  File "([^"]+)"', traceback, re.M):
        assert path.endswith(("user.py", os.path.join("mpqueue", "client.py"))), out
    assert [line for line in before.splitlines() if line.strip()] == ours, out
    assert os.WIFSIGNALED(terminal.status) and os.WTERMSIG(terminal.status) == signal.SIGINT, terminal.status


def test_the_first_ctrl_c_withdraws_the_queued_jobs_and_the_running_ones_finish(cluster, run_script):
    cluster.start_worker(2)
    terminal = run_script("map", cluster.address, 4, 20)
    wait_started(terminal, 2)
    pressed = terminal.ctrl_c()
    terminal.wait(30)

    line = FIRST.search(terminal.output)
    assert line and line.groups() == ("18", "2"), terminal.output
    check_ending(terminal, [line[0]])
    # It waited for the running jobs, which finished; the queued ones never ran.
    assert terminal.ended_at - pressed > 1
    status = cluster.wait_for(lambda s: s["running"] == 0, "the jobs to end")
    assert (status["queued"], status["done"]) == (0, 2)
    time.sleep(1)
    assert started(terminal) == 2


def test_a_second_ctrl_c_stops_the_running_jobs_and_exits_at_once(cluster, run_script):
    cluster.start_worker(2)
    terminal = run_script("map", cluster.address, 60, 20)
    wait_started(terminal, 2)
    terminal.ctrl_c()
    terminal.wait_for("Ctrl-C again", 15)
    pressed = terminal.ctrl_c()
    terminal.wait(15)

    assert terminal.ended_at - pressed < 5, terminal.output
    check_ending(terminal, ["withdrew 18 queued jobs; 2 running will finish; Ctrl-C again to stop them",
                            "stopped 2 running jobs"])
    status = cluster.wait_for(lambda s: s["running"] == 0, "the running jobs to be stopped")
    assert (status["queued"], status["done"]) == (0, 0)
    assert started(terminal) == 2


def test_a_ctrl_c_during_the_withdraw_call_waits_for_its_answer(cluster, run_script):
    """The second Ctrl-C comes while the broker handles the first one's
    withdraw: held until the call returns, it then stops the running jobs."""
    cluster.start_worker(2)
    terminal = run_script("slow-withdraw", cluster.address, 60, 20)
    wait_started(terminal, 2)
    terminal.ctrl_c()
    terminal.wait_for("withdrawing", 15)
    terminal.ctrl_c()
    terminal.wait(20)

    check_ending(terminal, ["withdrawing",
                            "withdrew 18 queued jobs; 2 running will finish; Ctrl-C again to stop them",
                            "withdrawing",
                            "stopped 2 running jobs"])
    status = cluster.wait_for(lambda s: s["running"] == 0, "the running jobs to be stopped")
    assert status["queued"] == 0
    assert started(terminal) == 2


@pytest.mark.parametrize("presses", [1, 2])
def test_a_private_cluster_says_one_line_and_leaves_no_process(isolated, run_script, presses):
    """Client() with no address: its broker and worker must not take the
    terminal's Ctrl-C as theirs (they once stopped under the client, which
    printed 37 lines of reconnect errors); they stop with the client."""
    procs = usable_cpus()
    terminal = run_script("map", "-", 3 if presses == 1 else 60, 4 * procs)
    wait_started(terminal, procs)
    cluster = psutil.Process(terminal.pid).children(recursive=True)
    assert len(cluster) >= 3    # broker, worker, its forkserver and children
    terminal.ctrl_c()
    if presses == 2:
        terminal.wait_for("Ctrl-C again", 15)
        terminal.ctrl_c()
    terminal.wait(30)

    _, alive = psutil.wait_procs(cluster, timeout=2)
    assert not alive, f"still running after the client exited: {alive}"
    lines = [f"withdrew {3 * procs} queued jobs; {procs} running will finish; Ctrl-C again to stop them"]
    if presses == 2:
        lines.append(f"stopped {procs} running job{'s' * (procs != 1)}")
    check_ending(terminal, lines)
    assert started(terminal) == procs



def test_a_ctrl_c_that_ends_the_script_elsewhere_withdraws_the_queued_jobs_too(cluster, run_script):
    """Ctrl-C in `as_completed` (the standard library's wait, not ours), with
    no with block: the script ends on it, and the client, at exit, withdraws
    the queued jobs instead of waiting for them all."""
    cluster.start_worker(2)
    terminal = run_script("as_completed", cluster.address, 4, 20)
    wait_started(terminal, 2)
    terminal.ctrl_c()
    terminal.wait(30)

    out = terminal.output
    assert "During handling" not in out and out.count("Traceback (most recent call last):") == 1, out
    # Python's traceback first (the script has ended), then our line, at exit.
    assert out.rstrip().endswith("\nKeyboardInterrupt\nwithdrew 18 queued jobs; 2 running will finish; "
                                 "Ctrl-C again to stop them"), out
    status = cluster.wait_for(lambda s: s["running"] == 0, "the jobs to end")
    assert (status["queued"], status["done"]) == (0, 2)
    assert started(terminal) == 2

"""Large arguments through shared memory on the broker's host (`mpqueue.shm`),
and nothing left in /dev/shm whoever is killed."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time

import cloudpickle
import pytest

from helpers import eventually, read_line
from mpqueue import shm

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")
BIG = 2 << 20


def ours(pids) -> list[str]:
    """The payload files written by these processes."""
    return [p for p in glob.glob(os.path.join(shm.DIRECTORY, "mpqueue-*"))
            if (found := shm._parse(os.path.basename(p))) is not None and found[0] in pids]


def produce(size: int) -> bytes:
    return os.urandom(size)


def describe(data: bytes, seconds: float = 0) -> tuple[int, bytes]:
    time.sleep(seconds)
    return len(data), data[-4:]


def test_a_big_argument_goes_through_shared_memory_and_its_file_goes_with_its_job(cluster):
    cluster.start_worker(2)
    client = cluster.client()
    assert client._shm is not None     # on the broker's host: its local socket
    blobs = [os.urandom(BIG) for _ in range(4)]
    futures = [client.submit(describe, b, 1.0) for b in blobs]
    eventually(lambda: len(ours({os.getpid()})) == 4, "the four payload files")
    eventually(lambda: cluster.status()["running"] >= 1, "the jobs to run")
    assert len(ours({os.getpid()})) >= 2       # the queued ones' files are there still
    assert [f.result(30) for f in futures] == [(BIG, b[-4:]) for b in blobs]
    eventually(lambda: not ours({os.getpid()}), "the files to be removed")
    assert client.submit(describe, b"small").result(30) == (5, b"mall")     # small ones inline


def test_a_big_result_comes_back_through_shared_memory_and_its_file_goes_when_acknowledged(cluster):
    worker = cluster.start_worker(2)
    client = cluster.client()
    results = [client.submit(produce, BIG + i) for i in range(3)]
    assert [len(f.result(30)) for f in results] == [BIG, BIG + 1, BIG + 2]
    assert len({f.result() for f in results}) == 3
    client.shutdown()       # it acknowledges what it has: the last files go
    eventually(lambda: not ours({worker.pid}), "the result files to be removed")


CLIENT = """
import os, sys, time
from mpqueue import Client
def slow(data):
    time.sleep(3)
c = Client(sys.argv[1])
futures = [c.submit(slow, os.urandom(2 << 20)) for _ in range(3)]
print("submitted", flush=True)
time.sleep(120)
"""


def test_nothing_is_left_in_dev_shm_after_a_kill_9_of_the_client_or_the_broker(cluster):
    cluster.start_worker(1)
    client = cluster.popen([sys.executable, "-c", CLIENT, cluster.address], "client", stdout=subprocess.PIPE)
    assert read_line(client.stdout, 30).strip() == "submitted"
    eventually(lambda: len(ours({client.pid})) == 3, "the client's payload files")
    # After its grace its queued jobs are dropped, their files with them; the running one's when it ends.
    client.kill()
    eventually(lambda: not ours({client.pid}), "the dead client's files to go", timeout=30)

    second = cluster.popen([sys.executable, "-c", CLIENT, cluster.address], "client2", stdout=subprocess.PIPE)
    assert read_line(second.stdout, 30).strip() == "submitted"
    port = cluster.address.rsplit(":", 1)[1]
    cluster.broker.kill()   # no journal: the jobs are lost, the files not yet
    second.kill()
    cluster.broker.wait(10)
    assert ours({second.pid})
    cluster.start_broker("--port", port)    # it sweeps the files of dead writers at start
    eventually(lambda: not ours({second.pid}), "the files to be swept", timeout=15)


def test_a_journal_keeps_the_bytes_and_its_restart_removes_the_files(empty, tmp_path):
    journal = tmp_path / "journal.db"
    empty.start_broker("--journal", str(journal))
    client = empty.client(reconnect_timeout=30)
    blob = os.urandom(BIG)
    future = client.submit(describe, blob)
    eventually(lambda: ours({os.getpid()}), "the payload file")
    port = empty.address.rsplit(":", 1)[1]
    empty.broker.kill()
    empty.broker.wait(10)
    empty.start_broker("--journal", str(journal), "--port", port)
    assert not ours({os.getpid()})      # the journal has the bytes: the file went at the restart
    empty.start_worker(1)
    assert future.result(60) == (BIG, blob[-4:])


def own_dev_shm(command: str) -> list[str]:
    """``command`` run with a /dev/shm of its own, as a process on another
    host (or in a container) has; skips where that cannot be made."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a /dev/shm of its own")
    probe = subprocess.run([unshare, "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode().strip()}")
    return [unshare, "-m", "sh", "-c", f"mount -t tmpfs tmpfs /dev/shm && exec {command}"]


ISOLATED_CLIENT = """
import os, sys
from mpqueue import Client
def echo_size(data):
    return os.urandom(len(data) + 1)
with Client(sys.argv[1]) as c:
    print("shm", c._shm is not None)
    print(len(c.submit(echo_size, os.urandom(2 << 20)).result(60)))
"""


def test_a_client_with_a_dev_shm_of_its_own_sends_and_gets_bytes(cluster, tmp_path):
    """It shares the broker's local socket but not its /dev/shm (a container
    on the host's network): its arguments go inline, and the result the job
    left in shared memory comes from the broker."""
    script = tmp_path / "client.py"
    script.write_text(ISOLATED_CLIENT)
    cluster.start_worker(1)
    result = subprocess.run(own_dev_shm(f"{sys.executable} {script} {cluster.address}"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shm", "False", str((2 << 20) + 1)]


def test_a_worker_that_cannot_see_the_file_gets_the_bytes_from_the_broker(empty):
    """A worker with a /dev/shm of its own, as one on another host has."""
    command = own_dev_shm("true")[:-1]
    empty.start_broker()
    client = empty.client()
    blob = os.urandom(BIG)
    future = client.submit(describe, blob)
    eventually(lambda: ours({os.getpid()}), "the payload file")
    empty.popen([*command, f"mount -t tmpfs tmpfs /dev/shm && exec {sys.executable} -m mpqueue worker "
                 f"{empty.address} --procs 1"], "worker")
    assert future.result(60) == (BIG, blob[-4:])


FULL = """
import os
from mpqueue import Client
def echo_size(data):
    return os.urandom(len(data) + 1)
with Client() as c:
    print("shm", c._shm is not None)
    print(len(c.submit(echo_size, os.urandom(3 << 20)).result(60)))
    print(os.listdir("/dev/shm") == [n for n in os.listdir("/dev/shm") if n.endswith(".probe")])
"""


def test_a_full_dev_shm_sends_the_bytes_instead(isolated, tmp_path):
    """A private cluster whose /dev/shm holds 1 MiB: neither the 3 MiB
    argument nor the result fits, and both travel as bytes."""
    script = tmp_path / "full.py"
    script.write_text(FULL)
    command = own_dev_shm("true")[:-1]
    result = subprocess.run([*command, f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} "
                             f"{script}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["shm", "True", str((3 << 20) + 1), "True"]


def test_arguments_whose_file_is_gone_fail_their_job_saying_so(cluster):
    client = cluster.client()
    future = client.submit(describe, os.urandom(BIG))
    eventually(lambda: ours({os.getpid()}), "the payload file")
    for path in ours({os.getpid()}):
        os.unlink(path)
    cluster.start_worker(1)
    with pytest.raises(FileNotFoundError, match="the job's arguments in .* are gone"):
        future.result(30)


def test_a_broker_sweeps_only_its_own_files_and_those_of_a_dead_broker():
    """Two brokers on one host (or two private clusters in one process): a
    result file whose writer is gone (its worker left) but that a live broker
    still hands on is not another broker's to remove; once that broker is
    gone too, any broker removes it."""
    other_broker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead_owner = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner.wait()
    other = os.path.join(shm.DIRECTORY, f"mpqueue-0123456789ab-{other_broker.pid}-{other_broker.pid}.probe")
    same_process = os.path.join(shm.DIRECTORY, f"mpqueue-ba9876543210-{os.getpid()}-{os.getpid()}.probe")
    mine = os.path.join(shm.DIRECTORY, f"mpqueue-ffffffffffff-{os.getpid()}-{os.getpid()}.probe")
    references = [shm.write(b"a result", shm.tag("worker123456", probe), owner=dead_owner.pid)
                  for probe in (other, same_process)]
    assert None not in references
    theirs, neighbours = [shm.path_of(r) for r in references]
    try:
        assert {theirs, neighbours} & set(shm.orphans(mine)) == set()
        assert theirs in shm.orphans(other)             # its own broker's, its owner dead
        assert neighbours in shm.orphans(same_process)
        other_broker.kill()
        other_broker.wait()
        assert theirs in shm.orphans(mine)              # its broker died too
    finally:
        other_broker.kill()
        other_broker.wait()
        shm.remove(theirs)
        shm.remove(neighbours)

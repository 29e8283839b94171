"""Network blips: a peer's connections break while the broker lives on.

A blip is what a NAT or firewall losing its state, or a link that breaks one
way, does: the peer (a worker or client) sees its connections close, while the
broker sees nothing at all. Its side of each old connection stays open, and
whatever it sends there vanishes. The peer reconnects and registers again at
once, so for a while the broker holds two generations of the same session:
calls still parked on the dead connections, and live ones on the new.

`BlipProxy` fakes exactly that on 127.0.0.1. These tests pin down defects a
review reproduced with it: anything the broker hands to a parked call of the
old generation (a job lease, a withdraw request, a cancel's reply) is lost
unless the broker or the peer takes care to hand it on again.
"""

from __future__ import annotations

import concurrent.futures
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from helpers import eventually
from mpqueue import Client

#: The broker's and the worker's parked fetch and control calls wait this long
#: (not 2 s): a call left on a dead connection is surely still there.
LONG_WAIT = {"MPQUEUE_WAIT_SLICE": "20"}


@pytest.fixture(autouse=True)
def tcp_only(monkeypatch):
    """The brokers offer no local socket: a peer would take it and bypass the proxy."""
    monkeypatch.setenv("MPQUEUE_LOCAL_SOCKET", "0")


class BlipProxy:
    """A TCP proxy to the broker on 127.0.0.1 that can fake network trouble.

    ``blip()``: the peer's side of every current connection closes, while the
    broker's side stays open and black-holed (nothing more reaches it, what it
    sends is dropped). ``gate(False)``: new connections are reset at once.
    ``mute()``: what the broker sends on current connections is dropped
    (counted in ``dropped``), requests still pass.
    """

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.server.getsockname()[1]
        self.is_open = True
        self.dropped = 0
        self.pairs: list[dict] = []         # current connections
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self._thread(self._accept)

    def _thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self.server.accept()
            except OSError:
                return      # closed
            try:
                if not self.is_open:
                    raise ConnectionRefusedError
                broker = socket.create_connection(self.target)
            except OSError:
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()    # a reset
                continue
            pair = {"peer": peer, "broker": broker, "hole": False, "mute": False}
            with self.lock:
                self.sockets += [peer, broker]
                self.pairs.append(pair)
            self._thread(self._pump, pair, "peer", "broker")
            self._thread(self._pump, pair, "broker", "peer")

    def _pump(self, pair: dict, src: str, dst: str) -> None:
        try:
            while data := pair[src].recv(65536):
                if pair["hole"]:
                    continue
                if src == "broker" and pair["mute"]:
                    self.dropped += len(data)
                    continue
                pair[dst].sendall(data)
        except OSError:
            pass
        if not pair["hole"]:    # an ordinary close: pass it on
            for side in ("peer", "broker"):
                try:
                    pair[side].shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def blip(self) -> int:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            pair["hole"] = True
            try:
                pair["peer"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(pairs)

    def mute(self) -> None:
        with self.lock:
            for pair in self.pairs:
                pair["mute"] = True

    def gate(self, is_open: bool) -> None:
        self.is_open = is_open

    def close(self) -> None:
        self.is_open = False
        try:
            self.server.shutdown(socket.SHUT_RDWR)     # wakes the accept() call
        except OSError:
            pass
        self.server.close()
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        for sock in sockets:
            sock.close()


@pytest.fixture
def blip_proxy():
    """``blip_proxy(address)``: a BlipProxy to that broker, closed at the end.

    Ask for it after ``cluster`` or ``empty``: it then closes first, and the
    broker sees the dead connections end. A call that waits on a worker that
    will never answer (as one did before the fixes) then ends too, rather
    than hang the teardown.
    """
    proxies = []

    def make(target: str) -> BlipProxy:
        proxies.append(BlipProxy(target))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()




def test_a_job_submitted_after_a_worker_blip_is_not_leased_on_its_dead_connection(empty, blip_proxy):
    """The broker's thread of the worker's old fetch call, still parked on
    the dead connection, must not take jobs for the rejoined worker."""
    empty.start_broker(env=LONG_WAIT)
    proxy = blip_proxy(empty.address)
    worker = empty.start_worker(1, address=proxy.address, env=LONG_WAIT)
    client = empty.client()
    assert client.submit(abs, -1).result(15) == 1
    time.sleep(0.5)                     # its next fetch call is parked at the broker
    assert proxy.blip() >= 2            # fetch and control calls among them
    # (Its log read through a file of our own: logs() moves the offset the worker writes at.)
    eventually(lambda: "rejoined" in Path(worker.log.name).read_text(), "the worker to rejoin", 10)
    time.sleep(1.5)                     # a heartbeat: each thread has met its broken connection
    # One at a time: each submission wakes the longest parked fetch call.
    futures = []
    for i in range(2, 6):
        futures.append(client.submit(abs, -i))
        time.sleep(0.2)
    _, lost = concurrent.futures.wait(futures, timeout=8)
    status = empty.status()
    assert not lost, (f"{len(lost)} job(s) never came back; the broker says {status['queued']} queued, "
                      f"the worker holds {status['workers'][0]['queued']} it does not run")
    assert [f.result() for f in futures] == [2, 3, 4, 5]
    assert status["queued"] == 0


def test_a_cancel_asked_while_its_worker_blips_returns_once_the_worker_rejoins(cluster, blip_proxy):
    """The withdraw request went to the worker's old registration (or onto a
    dead connection); the rejoin queues the prefetched job back, and the
    cancel, which waited for the worker's answer, must see that."""
    proxy = blip_proxy(cluster.address)
    cluster.start_worker(1, address=proxy.address)
    client = cluster.client()
    running = client.submit(time.sleep, 6)
    prefetched = client.submit(abs, -2)
    cluster.wait_for(lambda s: s["running"] == 1 and s["workers"][0]["queued"] == 1,
                     "one job running and one prefetched")
    proxy.gate(False)                   # it cannot come back for a while
    assert proxy.blip() >= 2
    verdict = []
    canceller = threading.Thread(target=lambda: verdict.append(prefetched.cancel()), daemon=True)
    canceller.start()
    time.sleep(1.5)
    assert not verdict, "the cancel cannot have an answer while the worker is away"
    proxy.gate(True)
    canceller.join(8)
    assert not canceller.is_alive(), "the cancel still waits 8 s after the link came back"
    assert verdict == [True]
    assert prefetched.cancelled()
    assert not running.done()
    # The worker carries on.
    assert client.submit(abs, -3).result(15) == 3
    assert running.result(1) is None


def test_a_cancel_whose_reply_was_lost_says_true_when_asked_again(cluster, blip_proxy):
    """The broker withdrew the job, the reply was lost, the client reconnected
    and asked again: the job is cancelled, not 'lost by a journal'."""
    proxy = blip_proxy(cluster.address)
    client = Client(proxy.address)
    cluster.clients.append(client)
    future = client.submit(abs, -1)     # no worker: it stays queued
    cluster.wait_for(lambda s: s["queued"] == 1, "the job to reach the broker")
    proxy.mute()                        # the cancel's reply is dropped...
    threading.Timer(0.5, proxy.blip).start()    # ...then its connection breaks
    assert future.cancel() is True
    assert proxy.dropped > 0, "no reply was lost: the test did not test anything"
    assert future.cancelled()
    assert cluster.status()["queued"] == 0
    client.shutdown()       # before the proxy closes: no reconnect to wait for

"""Benchmark mpqueue against ``multiprocessing.Pool(2)`` on the same workloads.

Run from the repository root::

    python benchmarks/bench.py            # full run (under a minute on 2 idle cores)
    python benchmarks/bench.py --quick    # smaller and faster, for a smoke check
    python benchmarks/bench.py --json     # also dump every raw figure as JSON (stdout)
    python benchmarks/bench.py --json out.json   # ... or into a file
    python benchmarks/bench.py --only apply_cb,starmap   # only these workloads (--help lists them)

Progress goes to stderr; the table (and JSON, if asked for) to stdout. The exit
status is 1 if anything went wrong, including problems found in mpqueue (a
process that crashed, hung or was left behind), which are listed on stderr.

mpqueue runs as a real cluster: a broker subprocess (``mpqueue broker --port 0``)
and one worker subprocess (``mpqueue worker HOST:PORT --procs 2``), both run as
``python -m mpqueue`` with this interpreter (from the repository root, that is
the working tree's package) and with a fresh random ``MPQUEUE_AUTHKEY``; this
process connects with ``mpqueue.Client("HOST:PORT", authkey=...)``. Nothing is
timed before the worker is registered and both of its children have run a
warm-up job. The baseline is one ``multiprocessing.Pool(2)`` (the platform's
default start method), warmed up the same way. Each workload runs on both, alternating which
goes first, ``--reps`` times; the table shows the median over repetitions.

Workloads:

cold start  ``with Client() as c: c.submit(abs, -1).result()`` on a private
            local cluster (no address, ``$MPQUEUE_ADDRESS`` unset): time to the
            first result, and total including the cluster's shutdown. Pool:
            ``Pool(2)`` creation to the first ``apply_async(abs, (-1,))``
            result, and total including ``close()``/``join()``. Each start-up
            (this one and ``pool start``) runs in a new interpreter, timed
            from the call after the import, as a script's would.
W1          10,000 no-op jobs, one ``submit`` (``apply_async``) each, then all
            results gathered: jobs/s, first submit to last result.
W1 map      1,000,000 no-op items through ``mpqueue.Pool(2).map`` and
            ``multiprocessing.Pool(2).map``, each with its automatic chunk size:
            items/s.
W2          300 sequential round trips of a tiny job (submit, wait for the
            result, repeat; Pool: ``apply_async(...).get()``): median and p99
            latency in ms.
W3          32 jobs of ~100 ms pure-Python CPU work (the loop is calibrated once
            on this machine): parallel efficiency = sum of per-job CPU time
            (``time.process_time`` measured inside the job and returned) /
            (2 cores x wall time). 100% means both cores did nothing but jobs.
W4          100 jobs each taking a distinct 1 MiB ``bytes`` argument (made before
            timing) and returning its length: MB/s (10^6 bytes) of arguments moved.
            Before the first repetition, each system moves the same amount once
            through its ``map``, untimed (see ``w4_bandwidth``).
W5          20 jobs each taking a distinct 64 MiB NumPy array (float64, made before
            timing) and returning a new one (``array + 1``): MB/s (10^6 bytes) of
            arguments and results moved, and the peak RSS of mpqueue's broker
            during the jobs, as a multiple of one argument (its high-water mark,
            VmHWM, reset before each repetition). Needs numpy (the ``bench``
            extra: ``pip install mpqueue[bench]``); skipped with a note without it.

The drop-in ``mpqueue.Pool`` against ``multiprocessing.Pool(2)``:

pool start  ``mpqueue.Pool(2)`` on a private local cluster (no address), then
            ``apply(abs, (-1,))``: time to that result, and total including
            ``close()``/``join()`` (which stop the cluster). Pool: the same calls
            on ``multiprocessing.Pool(2)``. Run with the cold starts.
apply cb    3,000 ``apply_async(pow, (i, 2), callback=..., error_callback=...)``
            calls, then every result waited for: jobs/s, first call to last
            result (a result is ready after its callback ran).
starmap     ``starmap(pow, [(i, 2) for i in range(200_000)], chunksize=1000)``:
            items/s.

In ``apply cb`` and ``starmap``, the ``mpqueue.Pool`` is on the cluster above,
made with no ``processes`` (no bound on the jobs it has out, like the private
cluster of ``mpqueue.Pool(2)``; ``processes=2`` would allow it only two jobs on
the cluster at once, a round trip each, which measures that bound instead).

The ratio column is mpqueue / Pool; the "better" column says which direction
is good for that metric (for jobs/s, MB/s and efficiency a ratio below 1 means
mpqueue is worse; for latencies and start-up times a ratio above 1 does).

Everything the script starts (the cluster, local clusters, the Pool) is
stopped in ``finally`` blocks, also on Ctrl-C, SIGTERM or an error: the
cluster with ``mpqueue shutdown HOST:PORT`` and then a wait / terminate / kill
ladder. Every mpqueue process carries a tag in its environment; at the end any
tagged process still alive (even one re-parented to init) is reported as a
leak and killed by its PID.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter

import psutil

import mpqueue

TAG_VAR = "MPQBENCH_TAG"     # not MPQUEUE_*: mpqueue warns of names it does not know
TAG = uuid.uuid4().hex
MPQUEUE = [sys.executable, "-m", "mpqueue"]     # the `mpqueue` command, same interpreter
PROCS = 2

FULL = dict(reps=3, cold_reps=3, w1_jobs=10_000, w1_map_items=1_000_000, w2_trips=300, w3_jobs=32, w3_ms=100.0,
            w4_jobs=100, w4_bytes=1 << 20, w5_jobs=20, w5_bytes=64 << 20,
            apply_cb_calls=3_000, starmap_items=200_000, starmap_chunksize=1000)
QUICK = dict(reps=1, cold_reps=1, w1_jobs=2_000, w1_map_items=100_000, w2_trips=100, w3_jobs=8, w3_ms=100.0,
             w4_jobs=20, w4_bytes=1 << 20, w5_jobs=4, w5_bytes=64 << 20,
             apply_cb_calls=1_000, starmap_items=50_000, starmap_chunksize=1000)

#: Set when a call had to be abandoned (it still runs in a daemon thread): the
#: interpreter's exit would then wait for it (Client registers an atexit shutdown).
HUNG = False

#: Generous bounds: a workload that takes longer than this is reported as a hang.
WORKLOAD_TIMEOUT = 120.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- the jobs (module level; cloudpickle sends __main__'s functions by value) ---

def noop(x):
    return x


def burn(n):
    """Pure-Python CPU work; returns the CPU seconds it took, measured in the job."""
    start = time.process_time()
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return time.process_time() - start


def nbytes(blob):
    return len(blob)


def plus_one(array):
    """W5's job: a new array as large as its argument (NumPy's ``+``; numpy is not
    imported here, so that bench.py runs without it)."""
    return array + 1


def warmup_job(seconds):
    time.sleep(seconds)
    return os.getpid()


def calibrate(target_ms: float) -> tuple[int, float]:
    """Loop count for which `burn` takes about ``target_ms`` of CPU here."""
    n = 20_000
    while burn(n) < 0.02:
        n *= 2
    samples = []
    for _ in range(3):
        n = max(1, int(n * (target_ms / 1000) / burn(n)))
        samples.append(burn(n))
    return n, statistics.median(samples) * 1000


# -- statistics -------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- process bookkeeping -------------------------------------------------------------

def tagged_processes() -> list[tuple[int, str]]:
    """Live (non-zombie) processes with our tag in their environment: (pid, cmdline)."""
    found = []
    if not os.path.isdir("/proc"):
        return found
    needle = f"{TAG_VAR}={TAG}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        found.append((int(entry), cmdline))
    return found


def stop_process(process: subprocess.Popen, name: str, grace: float, problems: list[str]) -> None:
    """Wait for an already-asked process, then terminate, then kill. Ctrl-C skips to kill."""
    steps = [(None, grace), ("terminate", 5.0), ("kill", 5.0)]
    for step, timeout in steps:
        try:
            if step == "terminate":
                process.terminate()
            elif step == "kill":
                process.kill()
            process.wait(timeout)
            if step is not None:
                problems.append(f"{name} (pid {process.pid}) did not exit within {grace:.0f} s "
                                f"of `mpqueue shutdown`; needed {step}")
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            process.kill()
            process.wait(5.0)
            return
    problems.append(f"{name} (pid {process.pid}) survived SIGKILL?")


def run_with_timeout(fn, timeout: float, what: str):
    """Run ``fn()`` in a daemon thread; raise BenchError if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:      # noqa: BLE001 - handed back to the caller
            box["error"] = e
    t = threading.Thread(target=target, daemon=True, name=what)
    t.start()
    t.join(timeout)
    if t.is_alive():
        global HUNG
        HUNG = True
        raise BenchError(f"{what} did not return within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- the mpqueue cluster --------------------------------------------------------------

class Cluster:
    """`mpqueue broker --port 0` and `mpqueue worker HOST:PORT --procs 2` as subprocesses."""

    def __init__(self, logdir: str, broker_args: tuple[str, ...] = ()):
        self.broker_args = broker_args
        self.authkey = secrets.token_hex(32)
        self.env = dict(os.environ, MPQUEUE_AUTHKEY=self.authkey, **{TAG_VAR: TAG})
        self.env.pop("MPQUEUE_ADDRESS", None)
        self.logdir = logdir
        self.broker: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.address: str | None = None
        self.problems: list[str] = []
        self._logs = []
        self._drain: threading.Thread | None = None

    def _log(self, name: str):
        f = open(os.path.join(self.logdir, name + ".log"), "wb")
        self._logs.append(f)
        return f

    def start(self) -> None:
        blog = self._log("broker")
        self.broker = subprocess.Popen(MPQUEUE + ["broker", "--port", "0", *self.broker_args], env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=blog)
        line = run_with_timeout(self.broker.stdout.readline, 30, "waiting for the broker's first line")
        line = line.decode(errors="replace")
        if "listening on" not in line:
            raise BenchError(f"broker did not start: {line.strip()!r}\n{self.tail('broker')}")
        self.address = line.rsplit("listening on", 1)[1].split()[0]

        def drain(stream=self.broker.stdout, sink=blog):    # nothing expected; never block it
            for chunk in iter(lambda: stream.read1(4096), b""):
                sink.write(chunk)
        self._drain = threading.Thread(target=drain, daemon=True, name="broker-stdout")
        self._drain.start()
        wlog = self._log("worker")
        self.worker = subprocess.Popen(MPQUEUE + ["worker", self.address, "--procs", str(PROCS)],
                                       env=self.env, stdin=subprocess.DEVNULL, stdout=wlog,
                                       stderr=subprocess.STDOUT)
        log(f"broker pid {self.broker.pid} on {self.address}, worker pid {self.worker.pid}")

    def status(self) -> dict:
        out = subprocess.run(MPQUEUE + ["status", self.address, "--json"], env=self.env,
                             capture_output=True, timeout=30)
        if out.returncode:
            raise BenchError(f"`mpqueue status` failed: {out.stderr.decode().strip()}")
        return json.loads(out.stdout)

    def wait_for_worker(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for name, p in (("broker", self.broker), ("worker", self.worker)):
                if p.poll() is not None:
                    raise BenchError(f"{name} exited with {p.returncode}\n{self.tail(name)}")
            info = self.status()
            if any(w["procs"] == PROCS for w in info["workers"]):
                return info
            if time.monotonic() > deadline:
                raise BenchError(f"no worker registered after {timeout:.0f} s\n{self.tail('worker')}")
            time.sleep(0.2)

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.logdir, name + ".log"), "rb") as f:
                text = f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- last lines of the {name} log ---\n" + "\n".join(text)

    def stop(self, interrupted: bool = False) -> None:
        """`mpqueue shutdown HOST:PORT`, then wait / terminate / kill each process.

        ``interrupted``: after Ctrl-C, which the cluster (same process group) also got,
        a non-zero exit is expected.
        """
        try:
            if self.address and self.broker and self.broker.poll() is None:
                t0 = time.perf_counter()
                out = subprocess.run(MPQUEUE + ["shutdown", self.address], env=self.env,
                                     capture_output=True, timeout=30)
                if out.returncode:
                    self.problems.append(f"`mpqueue shutdown {self.address}` exited {out.returncode}: "
                                         f"{out.stderr.decode().strip()}")
                log(f"`mpqueue shutdown` returned in {time.perf_counter() - t0:.2f} s")
        except (subprocess.TimeoutExpired, OSError) as e:
            self.problems.append(f"`mpqueue shutdown` failed: {e}")
        except KeyboardInterrupt:
            pass
        finally:
            t0 = time.perf_counter()
            if self.worker is not None:
                stop_process(self.worker, "worker", 15.0, self.problems)
            if self.broker is not None:
                stop_process(self.broker, "broker", 15.0, self.problems)
                if self._drain is not None:
                    self._drain.join(5)     # EOF now that the broker is gone
                if not (self._drain and self._drain.is_alive()):
                    self.broker.stdout.close()
            for f in self._logs:
                f.close()
            for name, p in (("worker", self.worker), ("broker", self.broker)):
                if p is not None and p.returncode not in (None, 0) and not interrupted:
                    self.problems.append(f"cluster {name} (pid {p.pid}) exited with {p.returncode}")
            if self.worker is not None or self.broker is not None:
                log(f"cluster processes exited {time.perf_counter() - t0:.2f} s after the shutdown "
                    f"request (worker rc {self.worker and self.worker.returncode}, "
                    f"broker rc {self.broker and self.broker.returncode})")


# -- the workloads: one function per (workload, system) ----------------------------------
# Each takes a `Runner` and returns a dict of figures.

def context_switches(pids: list[int]) -> int | None:
    """Voluntary context switches so far (sleeps ended by a wakeup) of all the
    threads of these processes; None where /proc does not tell (not Linux)."""
    if not os.path.isdir("/proc/self/task"):
        return None
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    total += sum(int(line.split()[1]) for line in f
                                 if line.startswith("voluntary_ctxt_switches:"))
            except OSError:
                pass    # the thread ended
    return total


class PeakRSS:
    """The peak resident memory of a process over a ``with`` block: the kernel's
    high-water mark (VmHWM), reset on entry through ``/proc/PID/clear_refs``. Where
    that is refused (another user's process, not Linux), RSS sampled every 5 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak: int | None = None
        self.sampled = False
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _hwm(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def __enter__(self) -> "PeakRSS":
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")    # reset the high-water mark to the current RSS
            self._hwm()
        except (OSError, StopIteration):
            self.sampled = True
            process = psutil.Process(self.pid)
            self.peak = process.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    try:
                        self.peak = max(self.peak, process.memory_info().rss)
                    except psutil.Error:
                        return
            self._sampler = threading.Thread(target=sample, daemon=True, name="peak-rss")
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        else:
            self.peak = self._hwm()


class MpqueueRunner:
    name = "mpqueue"

    def __init__(self, client: mpqueue.Client, cluster: "Cluster"):
        self.client = client
        self.cluster = cluster
        self.address, self.authkey = cluster.address, cluster.authkey
        self._pool: mpqueue.Pool | None = None
        self.warmed: set[str] = set()     # the workloads that had their untimed first pass

    def broker_memory(self) -> PeakRSS:
        return PeakRSS(self.cluster.broker.pid)

    def processes(self) -> list[int]:
        """This process (the client), the broker, the worker and its children."""
        worker = psutil.Process(self.cluster.worker.pid)
        return [os.getpid(), self.cluster.broker.pid, worker.pid,
                *(p.pid for p in worker.children(recursive=True))]

    def map(self, fn, items):
        """``mpqueue.Pool.map`` with its automatic chunk size: (results, wall seconds)."""
        with mpqueue.Pool(PROCS, address=self.address, authkey=self.authkey) as pool:
            start = time.perf_counter()
            results = pool.map(fn, items)
            return results, time.perf_counter() - start

    def many(self, fn, args_list, timeout=WORKLOAD_TIMEOUT):
        """Submit each job, then wait for all: (results, wall seconds)."""
        submit = self.client.submit
        start = time.perf_counter()
        futures = [submit(fn, *args) for args in args_list]
        _, not_done = concurrent.futures.wait(futures, timeout)
        wall = time.perf_counter() - start
        if not_done:
            raise BenchError(f"mpqueue: {len(not_done)} of {len(futures)} jobs still unfinished "
                             f"after {timeout:.0f} s")
        return [f.result() for f in futures], wall

    def round_trip(self, fn, *args):
        return self.client.submit(fn, *args).result(timeout=30)

    @property
    def pool(self) -> mpqueue.Pool:
        """One ``mpqueue.Pool`` on the cluster, made on first use (see the module's docstring)."""
        if self._pool is None:
            self._pool = mpqueue.Pool(address=self.address, authkey=self.authkey)
        return self._pool

    def close(self, terminate: bool = False) -> None:
        if self._pool is not None:
            if terminate:
                self._pool.terminate()
            else:
                self._pool.close()
            self._pool.join()


class PoolRunner:
    name = "Pool"

    def __init__(self, pool):
        self.pool = pool
        self.warmed: set[str] = set()

    def processes(self) -> list[int]:
        return [os.getpid(), *(p.pid for p in self.pool._pool)]

    def broker_memory(self) -> None:
        return None     # no broker

    def close(self, terminate: bool = False) -> None:
        pass    # main() closes the Pool

    def many(self, fn, args_list, timeout=WORKLOAD_TIMEOUT):
        apply = self.pool.apply_async
        start = time.perf_counter()
        pending = [apply(fn, args) for args in args_list]
        deadline = start + timeout
        results = [r.get(max(0.0, deadline - time.perf_counter())) for r in pending]
        return results, time.perf_counter() - start

    def round_trip(self, fn, *args):
        return self.pool.apply_async(fn, args).get(30)

    def map(self, fn, items):
        start = time.perf_counter()
        results = self.pool.map(fn, items)
        return results, time.perf_counter() - start


def w1_throughput(runner, p) -> dict:
    n = p["w1_jobs"]
    results, wall = runner.many(noop, [(i,) for i in range(n)])
    if results != list(range(n)):
        raise BenchError(f"{runner.name} W1: wrong results")
    return {"jobs": n, "wall_s": wall, "jobs_per_s": n / wall}


def w1_map(runner, p) -> dict:
    n = p["w1_map_items"]
    results, wall = runner.map(noop, range(n))
    if results != list(range(n)):
        raise BenchError(f"{runner.name} W1 map: wrong results")
    return {"items": n, "wall_s": wall, "items_per_s": n / wall}


def w2_latency(runner, p) -> dict:
    for i in range(10):                         # not timed
        runner.round_trip(noop, i)
    samples = []
    switches = context_switches(runner.processes())
    for i in range(p["w2_trips"]):
        t0 = time.perf_counter()
        value = runner.round_trip(noop, i)
        samples.append((time.perf_counter() - t0) * 1000)
        if value != i:
            raise BenchError(f"{runner.name} W2: wrong result")
    if switches is not None:
        switches = (context_switches(runner.processes()) - switches) / len(samples)
    return {"trips": len(samples), "median_ms": median(samples), "p99_ms": percentile(samples, 99),
            "max_ms": max(samples), "switches_per_trip": switches, "samples_ms": samples}


def w3_efficiency(runner, p) -> dict:
    n, jobs = p["burn_n"], p["w3_jobs"]
    cpu, wall = runner.many(burn, [(n,)] * jobs)
    return {"jobs": jobs, "wall_s": wall, "cpu_s": sum(cpu), "job_cpu_ms_median": median(cpu) * 1000,
            "efficiency": sum(cpu) / (PROCS * wall)}


def distinct_blobs(count: int, size: int) -> list[bytes]:
    """``count`` different ``bytes`` of ``size``, as users' arguments are: one object sent
    ``count`` times would let a pickler that batches jobs (Pool.map's chunks) send it once
    per batch, and measure nothing. os.urandom runs at about 1 GB/s: made before timing."""
    return [os.urandom(size) for _ in range(count)]


def w4_bandwidth(runner, p) -> dict:
    jobs, size = p["w4_jobs"], p["w4_bytes"]
    if "W4" not in runner.warmed:
        # Once per system, untimed: the same kind of payloads through its `map`, which
        # sends them in batches of several MiB, as a program that has moved data before
        # has done. Until a process has received one message of several MiB, glibc gives
        # each freed MiB back to the kernel, and Pool's children fault in every page of
        # every argument again: 250-700 faults per job, 0.8 against 1.5 GB/s here, and
        # a figure that depended on which workloads had run before this one.
        results, _ = runner.map(nbytes, distinct_blobs(jobs, size))
        if results != [size] * jobs:
            raise BenchError(f"{runner.name} W4 warm-up: wrong results")
        runner.warmed.add("W4")
    blobs = distinct_blobs(jobs, size)
    results, wall = runner.many(nbytes, [(blob,) for blob in blobs])
    if results != [size] * jobs:
        raise BenchError(f"{runner.name} W4: wrong results")
    moved = size * jobs
    return {"jobs": jobs, "bytes": moved, "wall_s": wall, "mb_per_s": moved / wall / 1e6}


#: The values W5's arrays are filled with: no two arrays alike, in a run.
W5_FILLS = itertools.count()


def w5_arrays(runner, p) -> dict:
    import numpy as np
    jobs, size = p["w5_jobs"], p["w5_bytes"]
    # Distinct contents, cheaply: each array filled with its own value (a memset).
    fills = [next(W5_FILLS) for _ in range(jobs)]
    arrays = [np.full(size // 8, fill, dtype=np.float64) for fill in fills]
    memory = runner.broker_memory()
    with memory or contextlib.nullcontext():
        results, wall = runner.many(plus_one, [(a,) for a in arrays])
    if any(r.nbytes != size or r[0] != fill + 1 or r[-1] != fill + 1 for r, fill in zip(results, fills)):
        raise BenchError(f"{runner.name} W5: wrong results")
    moved = 2 * size * jobs
    out = {"jobs": jobs, "bytes": moved, "wall_s": wall, "mb_per_s": moved / wall / 1e6}
    if memory is not None:
        out.update(broker_peak_rss=memory.peak, broker_peak_payloads=memory.peak / size,
                   broker_peak_sampled=memory.sampled)
    return out


def apply_callbacks(runner, p) -> dict:
    """``apply_async`` with a callback and an error callback, one call per item."""
    n = p["apply_cb_calls"]
    done: list = []
    failed: list = []
    apply = runner.pool.apply_async
    start = time.perf_counter()
    pending = [apply(pow, (i, 2), callback=done.append, error_callback=failed.append) for i in range(n)]
    deadline = start + WORKLOAD_TIMEOUT
    for result in pending:
        result.wait(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - start
    if failed or not all(r.ready() for r in pending):
        raise BenchError(f"{runner.name} apply cb: {len(failed)} failed, "
                         f"{sum(not r.ready() for r in pending)} unfinished")
    if [r.get(0) for r in pending] != [i * i for i in range(n)] or sorted(done) != [i * i for i in range(n)]:
        raise BenchError(f"{runner.name} apply cb: wrong results or callbacks")
    return {"calls": n, "wall_s": wall, "jobs_per_s": n / wall}


def starmap_chunks(runner, p) -> dict:
    n = p["starmap_items"]
    items = [(i, 2) for i in range(n)]
    pool = runner.pool
    start = time.perf_counter()
    results = pool.starmap(pow, items, chunksize=p["starmap_chunksize"])
    wall = time.perf_counter() - start
    if results != [i * i for i in range(n)]:
        raise BenchError(f"{runner.name} starmap: wrong results")
    return {"items": n, "wall_s": wall, "items_per_s": n / wall}


#: (key for --only and the JSON, function): each runs on both systems, alternating.
WORKLOADS = [("W1", w1_throughput), ("W1map", w1_map), ("W2", w2_latency), ("W3", w3_efficiency),
             ("W4", w4_bandwidth), ("W5", w5_arrays), ("apply_cb", apply_callbacks),
             ("starmap", starmap_chunks)]
#: Run first, while this process has no threads (Pool forks): the keys of the start-ups.
COLD_WORKLOADS = ["cold", "pool_start"]


def fresh(name: str, problems: list[str]) -> dict:
    """Run the start-up workload ``name`` (a function of this module) in a
    new interpreter, as a user's script starts: what it finds wrong is added
    to ``problems``. The time counts from the call that makes the pool or
    client, after ``import mpqueue`` (or ``multiprocessing``)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench; problems = []; "
            f"fn = bench.{name}; "
            "result = fn(problems) if fn.__code__.co_argcount else fn(); "
            "print(json.dumps([result, problems]))")
    env = {**os.environ, TAG_VAR: TAG}
    done = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, timeout=WORKLOAD_TIMEOUT, env=env)
    if done.returncode != 0:
        raise BenchError(f"{name} in a new interpreter failed: {done.stderr.strip()[-2000:]}")
    result, found = json.loads(done.stdout.strip().splitlines()[-1])
    problems.extend(found)
    return result


def cold_mpqueue(problems: list[str]) -> dict:
    """``with Client() as c: c.submit(abs, -1).result()`` on a private local cluster."""
    t0 = time.perf_counter()
    client = mpqueue.Client()
    try:
        value = client.submit(abs, -1).result(timeout=60)
        first = time.perf_counter() - t0
        cluster = getattr(client, "_cluster", None)
        processes = list(getattr(cluster, "processes", []))
    finally:
        # Same as leaving the `with` block (Executor.__exit__ -> shutdown(wait=True)), but
        # bounded so that a hang is reported, not waited out.
        try:
            run_with_timeout(lambda: client.shutdown(wait=True), 60, "Client().shutdown()")
        except BenchError:
            cluster = getattr(client, "_cluster", None)
            if cluster is not None:
                cluster.stop()      # the local cluster's own ask / terminate / kill ladder
            raise
    total = time.perf_counter() - t0
    if value != 1:
        raise BenchError("cold start: abs(-1) != 1")
    exits = local_cluster_exits(processes, "cold start", "Client.shutdown()", problems)
    return {"first_result_s": first, "total_s": total, "exit_codes": exits}


def local_cluster_exits(processes: list[subprocess.Popen], what: str, after: str,
                        problems: list[str]) -> dict:
    """The exit codes of a LocalCluster's broker and worker (a private attribute),
    which should have exited, with 0, by the time ``after`` returned."""
    exits = {}
    for p in processes:
        role = next((a for a in p.args if a in ("broker", "worker")), str(p.pid))
        exits[role] = p.poll()
        if p.returncode is None:
            problems.append(f"{what}: local cluster {role} (pid {p.pid}) still running after "
                            f"{after} returned")
        elif p.returncode != 0:
            how = f" ({signal.Signals(-p.returncode).name})" if p.returncode < 0 else ""
            problems.append(f"{what}: local cluster {role} exited with {p.returncode}{how}")
    return exits


def pool_start_mpqueue(problems: list[str]) -> dict:
    """``mpqueue.Pool(2)`` on a private local cluster, one ``apply``, ``close()``/``join()``."""
    t0 = time.perf_counter()
    pool = mpqueue.Pool(PROCS)
    try:
        value = run_with_timeout(lambda: pool.apply(abs, (-1,)), 60, "mpqueue.Pool(2).apply()")
        first = time.perf_counter() - t0
        processes = list(getattr(pool._dispatcher.cluster, "processes", []))
        pool.close()
        run_with_timeout(pool.join, 60, "mpqueue.Pool(2).join()")
    except BaseException:
        pool.terminate()
        run_with_timeout(pool.join, 60, "mpqueue.Pool(2).join() after terminate()")
        raise
    total = time.perf_counter() - t0
    if value != 1:
        raise BenchError("pool start: abs(-1) != 1")
    exits = local_cluster_exits(processes, "pool start", "mpqueue.Pool.join()", problems)
    return {"first_result_s": first, "total_s": total, "exit_codes": exits}


def _started_pool(what: str, first_result) -> dict:
    """A multiprocessing.Pool made, ``first_result(pool)`` of abs(-1), closed:
    the time to the result, and in all."""
    t0 = time.perf_counter()
    pool = multiprocessing.Pool(PROCS)
    try:
        value = first_result(pool)
        first = time.perf_counter() - t0
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    total = time.perf_counter() - t0
    if value != 1:
        raise BenchError(f"{what}: abs(-1) != 1")
    return {"first_result_s": first, "total_s": total}


def pool_start_pool() -> dict:
    return _started_pool("pool start", lambda pool: pool.apply(abs, (-1,)))


def cold_pool() -> dict:
    return _started_pool("cold start", lambda pool: pool.apply_async(abs, (-1,)).get(60))


# -- the table ----------------------------------------------------------------------------

def build_rows(raw: dict) -> list[tuple]:
    """The table's rows, for the workloads that ran."""
    def med(system, workload, key):
        return median([r[key] for r in raw[system][workload]])

    def ran(workload):
        return bool(raw["mpqueue"].get(workload))

    rows = []
    params = raw["params"]
    for workload, title in (("cold", "cold start"), ("pool_start", "Pool start + one apply")):
        if ran(workload):
            for key, label in (("first_result_s", "time to first result (ms)"),
                               ("total_s", "total incl. shutdown (ms)")):
                rows.append((title, label, med("mpqueue", workload, key) * 1000,
                             med("Pool", workload, key) * 1000, "lower", "{:,.0f}"))
    if ran("W1"):
        rows.append((f"W1 {params['w1_jobs']:,} no-op", "throughput (jobs/s)",
                     med("mpqueue", "W1", "jobs_per_s"), med("Pool", "W1", "jobs_per_s"), "higher",
                     "{:,.0f}"))
    if ran("W1map"):
        rows.append((f"W1 map {params['w1_map_items']:,} no-op", "Pool.map, auto chunks (items/s)",
                     med("mpqueue", "W1map", "items_per_s"), med("Pool", "W1map", "items_per_s"), "higher",
                     "{:,.0f}"))
    if ran("W2"):
        trips = params["w2_trips"]
        rows.append((f"W2 {trips} round trips", "median latency (ms)", med("mpqueue", "W2", "median_ms"),
                     med("Pool", "W2", "median_ms"), "lower", "{:.3f}"))
        rows.append((f"W2 {trips} round trips", "p99 latency (ms)", med("mpqueue", "W2", "p99_ms"),
                     med("Pool", "W2", "p99_ms"), "lower", "{:.3f}"))
        if raw["mpqueue"]["W2"][0]["switches_per_trip"] is not None:
            rows.append((f"W2 {trips} round trips", "wakeups per round trip",
                         med("mpqueue", "W2", "switches_per_trip"), med("Pool", "W2", "switches_per_trip"),
                         "lower", "{:.1f}"))
    if ran("W3"):
        rows.append((f"W3 {params['w3_jobs']} x {params['w3_ms']:.0f} ms CPU",
                     "parallel efficiency (%)", med("mpqueue", "W3", "efficiency") * 100,
                     med("Pool", "W3", "efficiency") * 100, "higher", "{:.1f}"))
    if ran("W4"):
        rows.append((f"W4 {params['w4_jobs']} x 1 MiB args", "argument bandwidth (MB/s)",
                     med("mpqueue", "W4", "mb_per_s"), med("Pool", "W4", "mb_per_s"), "higher", "{:,.1f}"))
    if ran("W5"):
        title = f"W5 {params['w5_jobs']} x {params['w5_bytes'] >> 20} MiB NumPy"
        rows.append((title, "args + results (MB/s)", med("mpqueue", "W5", "mb_per_s"),
                     med("Pool", "W5", "mb_per_s"), "higher", "{:,.1f}"))
        rows.append((title, "broker peak RSS (x one array)", med("mpqueue", "W5", "broker_peak_payloads"),
                     None, "lower", "{:.2f}"))
    if ran("apply_cb"):
        rows.append((f"apply_async {params['apply_cb_calls']:,} with callbacks", "throughput (jobs/s)",
                     med("mpqueue", "apply_cb", "jobs_per_s"), med("Pool", "apply_cb", "jobs_per_s"),
                     "higher", "{:,.0f}"))
    if ran("starmap"):
        rows.append((f"starmap {params['starmap_items']:,} pow, chunksize={params['starmap_chunksize']}",
                     "throughput (items/s)", med("mpqueue", "starmap", "items_per_s"),
                     med("Pool", "starmap", "items_per_s"), "higher", "{:,.0f}"))
    return rows


def format_table(rows: list[tuple], names: tuple[str, str] = ("mpqueue", "Pool")) -> str:
    header = ("workload", "metric", *names, "ratio", "better")
    body = []
    for workload, metric, a, b, better, fmt in rows:
        ratio = f"{a / b:.2f}x" if b else "n/a"
        body.append((workload, metric, fmt.format(a), "-" if b is None else fmt.format(b), ratio, better))
    widths = [max(len(r[i]) for r in body + [header]) for i in range(len(header))]
    align = ["<", "<", ">", ">", ">", "<"]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def mpqueue_source() -> str:
    """Where the mpqueue under test comes from: its directory, and git commit if any."""
    where = os.path.dirname(os.path.dirname(os.path.abspath(mpqueue.__file__)))
    try:
        def git(*a):
            return subprocess.run(["git", "-C", where, *a], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "mpqueue")
        return f"{where} @ {commit}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return where


# -- main ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one repetition")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also dump the raw figures as JSON, to FILE or (no FILE) stdout")
    parser.add_argument("--reps", type=int, help="repetitions of each workload (default 3, quick 1)")
    names = COLD_WORKLOADS + [name for name, _ in WORKLOADS]
    parser.add_argument("--only", metavar="NAMES", type=lambda text: text.split(","),
                        help=f"run only these workloads, comma-separated, of: {', '.join(names)}")
    args = parser.parse_args()
    selected = set(args.only or names)
    if selected - set(names):
        parser.error(f"unknown workload(s) {', '.join(sorted(selected - set(names)))}; "
                     f"choose from {', '.join(names)}")
    p = dict(QUICK if args.quick else FULL)
    skipped = []
    if "W5" in selected:
        try:
            import numpy  # noqa: F401
        except ImportError:
            selected.discard("W5")
            skipped.append("W5 skipped: it needs numpy (pip install mpqueue[bench], or numpy)")
            log(skipped[-1])
    if args.reps:
        p["reps"] = p["cold_reps"] = args.reps

    # Our own Ctrl-C-like exit on SIGTERM, so that the finally blocks run. Pool's forked
    # children inherit the handler: in them, SIGTERM (Pool.terminate) keeps its default.
    main_pid = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    os.environ.pop("MPQUEUE_ADDRESS", None)     # Client() must mean a private local cluster
    os.environ[TAG_VAR] = TAG                   # inherited by the local clusters' processes
    started = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    raw: dict = {"mpqueue": {}, "Pool": {}, "problems": [], "machine": {
        "python": sys.version.split()[0], "platform": platform.platform(), "cores": cores,
        "mpqueue_version": mpqueue.__version__, "mpqueue_source": mpqueue_source(),
        "pool_start_method": multiprocessing.get_start_method(),
        "loadavg_start": os.getloadavg()}}
    problems: list[str] = raw["problems"]

    log(f"mode {'quick' if args.quick else 'full'}: {p['reps']} repetition(s); {cores} cores, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "W3" in selected:
        p["burn_n"], per_job = calibrate(p["w3_ms"])
        log(f"calibrated W3 job: burn({p['burn_n']:,}) = {per_job:.1f} ms CPU in this process")
        raw["calibration"] = {"burn_n": p["burn_n"], "burn_ms": per_job}

    pool = cluster = client = None
    runners: list = []
    logdir = tempfile.mkdtemp(prefix="mpqueue-bench-")
    failed = False
    try:
        # Each start-up in a new interpreter: in this one, the second would
        # find the first's modules imported.
        starts = {"cold": (lambda: fresh("cold_mpqueue", problems), lambda: fresh("cold_pool", problems)),
                  "pool_start": (lambda: fresh("pool_start_mpqueue", problems),
                                 lambda: fresh("pool_start_pool", problems))}
        for name in COLD_WORKLOADS:
            if name not in selected:
                continue
            for key in ("mpqueue", "Pool"):
                raw[key][name] = []
            for rep in range(p["cold_reps"]):
                order = list(zip(("mpqueue", "Pool"), starts[name], strict=True))
                for system, fn in (order if rep % 2 == 0 else order[::-1]):
                    result = fn()
                    raw[system][name].append(result)
                    log(f"{name} {system}: first result {result['first_result_s'] * 1000:.0f} ms, "
                        f"total {result['total_s'] * 1000:.0f} ms")
            if threading.active_count() > 1:
                problems.append(f"threads still alive after {name}: "
                                f"{[t.name for t in threading.enumerate()]}")
        if selected - set(COLD_WORKLOADS):
            # The Pool is created before the Client starts its threads (Pool forks).
            pool = multiprocessing.Pool(PROCS)
            pool.map(warmup_job, [0.05] * (2 * PROCS))
            cluster = Cluster(logdir)
            cluster.start()
            info = cluster.wait_for_worker()
            log("worker registered: " + ", ".join(f"{w['id']} pid {w['pid']} procs {w['procs']}"
                                                  for w in info["workers"]))
            client = mpqueue.Client(cluster.address, authkey=cluster.authkey)
            pids = set(run_with_timeout(
                lambda: [f.result(60) for f in [client.submit(warmup_job, 0.2) for _ in range(2 * PROCS)]],
                90, "mpqueue warm-up"))
            log(f"warm-up done on mpqueue children {sorted(pids)}")

            runners = [MpqueueRunner(client, cluster), PoolRunner(pool)]
            for name, fn in WORKLOADS:
                if name not in selected:
                    continue
                for r in runners:
                    raw[r.name][name] = []
                for rep in range(p["reps"]):
                    for r in (runners if rep % 2 == 0 else runners[::-1]):
                        result = fn(r, p)
                        raw[r.name][name].append(result)
                        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                                 if not isinstance(v, list)}
                        log(f"{name} rep {rep + 1} {r.name}: {shown}")
    except KeyboardInterrupt:
        failed = True
        log("interrupted: cleaning up")
    except Exception as e:
        failed = True
        log(f"FAILED: {type(e).__name__}: {e}")
        if cluster is not None:
            for name in ("broker", "worker"):
                print(cluster.tail(name), file=sys.stderr)
    finally:
        for r in runners:
            try:
                run_with_timeout(lambda r=r: r.close(terminate=failed), 60, f"closing the {r.name} runner")
            except BaseException as e:      # noqa: BLE001 - keep cleaning up
                problems.append(f"{r.name} runner close: {type(e).__name__}: {e}")
        if client is not None:
            try:
                run_with_timeout(lambda: client.shutdown(wait=True, cancel_futures=failed), 60,
                                 "Client.shutdown()")
            except BaseException as e:      # noqa: BLE001 - keep cleaning up
                problems.append(f"client shutdown: {type(e).__name__}: {e}")
        if cluster is not None:
            cluster.stop(interrupted=failed)
            problems.extend(cluster.problems)
        if pool is not None:
            if failed:
                pool.terminate()
            else:
                pool.close()
            pool.join()
        deadline = time.monotonic() + 10
        while (left := tagged_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, cmdline in left:
            problems.append(f"leaked process {pid} ({cmdline}) still alive 10 s after cleanup: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    raw["machine"]["loadavg_end"] = os.getloadavg()
    raw["elapsed_s"] = time.perf_counter() - started
    raw["params"] = p
    for problem, count in Counter(problems).items():
        log(f"PROBLEM: {problem}" + (f" (x{count})" if count > 1 else ""))
    if failed:
        log(f"logs kept in {logdir}")
        return 1

    print(f"mpqueue {mpqueue.__version__} vs multiprocessing.Pool({PROCS}) "
          f"[{raw['machine']['pool_start_method']}], Python {raw['machine']['python']}, "
          f"{cores} cores, {'quick' if args.quick else 'full'} run, median of {p['reps']} rep(s) "
          f"(cold start: {p['cold_reps']})")
    print(f"mpqueue under test: {raw['machine']['mpqueue_source']}")
    print(format_table(build_rows(raw)))
    for note in skipped:
        print(note)
    print("ratio = mpqueue / Pool; 'better' = the direction that is good for the metric "
          "(lower: ratio > 1 means mpqueue is slower; higher: ratio < 1 means it is).")
    la, lb = raw["machine"]["loadavg_start"], raw["machine"]["loadavg_end"]
    if raw["mpqueue"].get("W3"):
        on = {s: median([r["job_cpu_ms_median"] for r in raw[s]["W3"]]) for s in ("mpqueue", "Pool")}
        print(f"W3 job: burn({p['burn_n']:,}) = {per_job:.0f} ms CPU when calibrated alone; median per job "
              f"during W3: {on['mpqueue']:.0f} ms (mpqueue), {on['Pool']:.0f} ms (Pool).")
    print(f"Load average {la[0]:.2f} -> {lb[0]:.2f}; "
          f"{raw['elapsed_s']:.0f} s in all" + (f"; {len(problems)} problem(s), see stderr" if problems else ""))
    if args.json:
        text = json.dumps(raw, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            log(f"raw figures written to {args.json}")
    shutil.rmtree(logdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    code = main()
    if HUNG:    # everything we started is already stopped; do not wait on the stuck call
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)
    sys.exit(code)

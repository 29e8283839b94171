"""``mpqueue``: the command line. Each command parses, resolves its config, and
calls one function of the package; errors of ours become one line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, cast

import click

from . import __version__, logs, shm
from .config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    SETTINGS,
    TLS_VARIABLES,
    Settings,
    authkey_path,
    format_address,
    is_loopback,
    parse_address,
    resolve_authkey,
    resolve_tls,
    warn_unknown_variables,
)
from .errors import ConfigError, MpqueueError
from .history import KEEP

broker_log = logging.getLogger("mpqueue.broker")

ADDRESS_HELP = "HOST:PORT of the broker [default: $MPQUEUE_ADDRESS, else 127.0.0.1:5555]"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MpqueueError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpqueue")
def main() -> None:
    """mpqueue: spread CPU-bound Python jobs over the cores of one or a few machines.

    \b
    mpqueue broker                          # on one host
    mpqueue worker HOST:PORT --procs 4      # on every host with cores to give
    python my_script.py                     # Client("HOST:PORT").map(fn, items)

    Every command takes its authkey from $MPQUEUE_AUTHKEY, else from the key
    file a broker writes on its host (~/.config/mpqueue/authkey). Anyone with
    the key can run code on the workers: keep it secret.
    """
    warn_unknown_variables()
    logs.configure()


def _watch_lifeline(on_eof) -> None:
    """Call ``on_eof`` when stdin closes: the process that started us is gone."""
    def watch():
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read
        # aborts the interpreter at exit.
        while os.read(0, 4096):
            pass
        on_eof()
    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _log_options(command):
    """``--log-level`` and ``--log-format``, for the long-running commands:
    `logs.configure` with them before anything else is logged."""
    def use(ctx, param, value):
        ctx.meta[param.name] = value
        if param.name == "log_format":      # click handles options in the order given: both are in by now
            logs.configure(ctx.meta.get("log_level"), value)
    command = click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
                           expose_value=False, callback=use,
                           help="text: a line for a person; json: one JSON object per line.")(command)
    return click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False), default=None,
                        expose_value=False, callback=use, is_eager=True,
                        help="Log this and worse [default: $MPQUEUE_LOG_LEVEL, else INFO].")(command)


def _tls_options(command):
    """``--tls-cert``, ``--tls-key``, ``--tls-ca``. Each sets its ``MPQUEUE_TLS_*``
    variable: the one setting the transport reads (`resolve_tls`)."""
    def use(ctx, param, value):
        if value is not None:
            os.environ[TLS_VARIABLES[param.name.removeprefix("tls_")]] = value
    for name, text in reversed((
            ("cert", "This process's TLS certificate. With --tls-key and --tls-ca, connections use "
                     "mutual TLS [default: $MPQUEUE_TLS_CERT]."),
            ("key", "The private key of --tls-cert [default: $MPQUEUE_TLS_KEY]."),
            ("ca", "The certificate of the CA that signed every member's certificate "
                   "[default: $MPQUEUE_TLS_CA]."))):
        command = click.option(f"--tls-{name}", type=click.Path(exists=True, dir_okay=False),
                               metavar="PEM", expose_value=False, callback=use, help=text)(command)
    return command


@main.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on. Anything but loopback exposes the cluster to the network.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 lets the OS choose.")
@click.option("--journal", type=click.Path(dir_okay=False), default=None,
              help="Keep jobs and results in this SQLite file, so that a broker restarted on it "
                   "loses nothing [default: memory only].")
@click.option("--result-ttl", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Drop results not collected after this long [default: $MPQUEUE_RESULT_TTL, else 86400].")
@click.option("--history", type=click.IntRange(min=0), default=KEEP, show_default=True, metavar="N",
              help="Keep the story of the last N finished jobs, for `mpqueue jobs` (in the journal too).")
@click.option("--dashboard", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Also serve a live page, /metrics for Prometheus and a JSON API on PORT of --host "
                   "(0: any free port), behind a token derived from the authkey.")
@click.option("--lifeline", is_flag=True, hidden=True, help="Exit when stdin closes.")
@_log_options
@_tls_options
def broker(host: str, port: int, journal: str | None, result_ttl: float | None, history: int,
           dashboard: int | None, lifeline: bool) -> None:
    """Serve the job and result queues until `mpqueue shutdown`, SIGTERM or Ctrl-C.

    Prints `listening on HOST:PORT` once it accepts connections; with
    --dashboard, then the page's address with its token, on a line of its
    own (over HTTPS with --tls-cert and --tls-key). See docs/observability.md.
    """
    had_key = bool(os.environ.get("MPQUEUE_AUTHKEY")) or authkey_path().exists()
    loopback = is_loopback(host)
    if not had_key and not loopback:
        raise ConfigError(
            f"refusing to listen on {host}, not a loopback address, without a configured authkey: "
            "set MPQUEUE_AUTHKEY to a long random secret, e.g. from "
            "`python3 -c 'import secrets; print(secrets.token_hex(32))'`, here and on every "
            f"worker and client (or write it to {authkey_path()}, mode 0600)")
    tls = resolve_tls()
    authkey = resolve_authkey(create=True)
    if os.environ.get("MPQUEUE_AUTHKEY"):
        source = "from $MPQUEUE_AUTHKEY"
    else:
        source = f"{'in' if had_key else 'generated in'} {authkey_path()} (mode 0600)"
    if lifeline:
        _watch_lifeline(lambda: os.kill(os.getpid(), signal.SIGTERM))

    def ready(address, dashboard_url):
        broker_log.info("authkey %s", source)
        if tls is not None:
            broker_log.info(
                "TLS with certificate %s; peers must present one signed by %s", tls.cert, tls.ca)
        elif not loopback:
            broker_log.warning(
                "listening on %s without TLS: the traffic is not encrypted (see --tls-cert)", host)
        line = f"mpqueue broker {__version__} listening on {format_address(address)}"
        if host in ("0.0.0.0", "::", ""):      # every address: none of them to give a worker as such
            reachable = ", ".join(f"{ip}:{address[1]}" for ip in _host_addresses())
            line += (f" (workers reach it at {reachable})" if reachable
                     else " (this host has no address but loopback)")
        click.echo(line)
        if dashboard_url:
            click.echo(dashboard_url)

    settings = SETTINGS if result_ttl is None else dataclasses.replace(SETTINGS, result_ttl=result_ttl)
    try:
        _serve_broker((host, port), authkey, ready, settings, journal, history, dashboard)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback aside: where a broker listening on
    every address can be reached from elsewhere."""
    import psutil

    return [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def _serve_broker(address: tuple[str, int], authkey: bytes,
                  on_ready: Callable[[tuple[str, int], str | None], None], settings: Settings = SETTINGS,
                  journal: str | None = None, history: int = KEEP, dashboard: int | None = None) -> None:
    """Run a broker until shutdown drains it, or until SIGTERM/SIGINT.

    The manager server runs in this process (its threads serve connections);
    this thread waits on the cluster's shutdown event and does the upkeep.
    With ``journal`` (a path), state is kept in, and first loaded from, that
    SQLite file. With ``dashboard`` (a port), the dashboard's server runs in
    threads of this process too; ``on_ready`` gets the page's URL.
    """
    from .broker import Broker
    from .connection import MAX_MESSAGE, keep_freed_memory
    from .journal import Journal
    from .protocol import BATCH_BYTES
    from .transport import BrokerServer

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    # A payload and a batch's others in one message; in SQLite, one value.
    ceiling = min(MAX_MESSAGE - 4 * BATCH_BYTES, 950 * 2**20 if journal else MAX_MESSAGE)
    if settings.max_payload > ceiling:
        raise ConfigError(f"MPQUEUE_MAX_PAYLOAD={settings.max_payload:.0f} is over the most this "
                          f"broker can carry in one message or store in its journal ({ceiling} bytes)")
    keep_freed_memory()
    broker = Broker(settings, Journal(journal) if journal else None, history)
    try:
        server = BrokerServer(broker, address, authkey)
        server.start()
        url = None
        if dashboard is not None:
            from .dashboard import Dashboard

            try:
                board = Dashboard(broker, (address[0], dashboard), authkey, resolve_tls())
            except OSError as e:
                raise ConfigError(f"cannot serve the dashboard on {address[0]}:{dashboard}: "
                                  f"{e.strerror or e}") from None
            board.start()
            url = board.url
        on_ready(cast("tuple[str, int]", server.address), url)   # the socket's, once bound
        broker.upkeep()
        broker_log.info("shut down")
    except KeyboardInterrupt:
        broker_log.info("stopped")
    finally:
        shm.remove(broker.shm_probe)     # a kill -9 leaves it to the next broker's sweep


@main.command()
@click.argument("address", required=False)
@click.option("--procs", type=click.IntRange(min=1), default=None,
              help="Processes running jobs [default: the number of usable cores].")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), default=None,
              help="Replace a child process after it has run this many jobs (leaky code).")
@click.option("--max-memory-per-child", type=click.IntRange(min=1), default=None, metavar="MIB",
              help="Replace a child whose memory (RSS) is over MIB mebibytes after a job; kill one "
                   "that grows past it while running, failing that job with WorkerLost.")
@click.option("--reconnect-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="If the broker goes away, keep running jobs and try to reconnect for this long, "
                   "then stop [default: $MPQUEUE_RECONNECT_TIMEOUT, else 60].")
@click.option("--lifeline", is_flag=True, hidden=True, help="Stop (cold) when stdin closes.")
@_log_options
@_tls_options
def worker(address: str | None, procs: int | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, reconnect_timeout: float | None, lifeline: bool) -> None:
    """Run jobs from the broker at ADDRESS in a pool of processes.

    \b
    ADDRESS: HOST:PORT, HOST (port 5555) or tcp://HOST:PORT of the broker
    [default: $MPQUEUE_ADDRESS, else 127.0.0.1:5555]. At start the worker
    waits up to 30 s ($MPQUEUE_BROKER_WAIT) for a broker that is not up yet.
    The key: $MPQUEUE_AUTHKEY, else ~/.config/mpqueue/authkey, which must be
    the broker's (copy it from the broker's host with scp -p).

    Jobs whose functions come from your own modules import them here: the
    directory the worker is started in comes first on sys.path (as with
    `python -m`), then $PYTHONPATH.

    Stops on `mpqueue shutdown`, or on SIGTERM/Ctrl-C: the first is a warm stop
    (running jobs finish), a second a cold stop (running jobs are killed and go
    back to the queue). Either way no job is lost.
    """
    # Like `python -m`, make modules in the current directory importable by jobs.
    sys.path.insert(0, os.getcwd())
    _start_forkserver()
    from .cluster import usable_cpus
    from .connection import keep_freed_memory
    from .worker import Worker

    keep_freed_memory()

    if procs is None:
        procs = usable_cpus()
    w = Worker(parse_address(address), resolve_authkey(), procs,
               max_tasks_per_child=max_tasks_per_child,
               max_memory_per_child=max_memory_per_child and max_memory_per_child << 20,
               reconnect_timeout=SETTINGS.reconnect_timeout if reconnect_timeout is None else reconnect_timeout)
    if lifeline:
        _watch_lifeline(lambda: w.stop(cold=True))
    try:
        code = w.run()
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _start_forkserver() -> None:
    """Start the forkserver of the worker's pool now, before importing the worker.

    It is a new interpreter that imports ``mpqueue.pool`` (`ProcessPool`'s
    preload, the same list, so the pool finds it running); started here, it
    does so while this process imports the worker's modules, instead of
    after, and the first children are ready that much sooner. Only the
    standard library is imported to do it. It inherits ``sys.path`` as it is
    now: the current directory is on it already.
    """
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(["mpqueue.pool"])
    forkserver.ensure_running()


@main.command()
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--wide", is_flag=True, help="Every column: pid, timed out, retried, versions.")
@click.option("--watch", is_flag=True,
              help="Refresh until Ctrl-C: totals, throughput and each worker's load (CPU, memory); "
                   "one line per refresh when not in a terminal.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="SECONDS",
              help="With --watch: how often.")
@_tls_options
def status(address: str | None, as_json: bool, wide: bool, watch: bool, interval: float) -> None:
    """Show the broker's workers and job counts.

    \b
    ADDRESS: HOST:PORT, HOST (port 5555) or tcp://HOST:PORT of the broker
    [default: $MPQUEUE_ADDRESS, else 127.0.0.1:5555]. The key: $MPQUEUE_AUTHKEY,
    else ~/.config/mpqueue/authkey. With --watch: see docs/observability.md.

    \b
    Columns, one row per worker (the table fits 80 columns; --wide adds more):
      WORKER   its id              HOST     its host name (cut to 12)
      ADDRESS  the IP address it connected from ("local": the broker's host)
      RUN      jobs running / processes     QUEUED  jobs it holds, not started
      DONE, FAILED  jobs it finished        LOST    deaths charged to its jobs
      SEEN     since it last reported (every second, even when idle)

    \b
    Then the installed packages jobs needed, and which workers have which
    version of each ("-": not installed); a job whose worker's version
    differs from its client's fails with EnvironmentMismatch.
    """
    from .transport import connect

    if watch and as_json:
        raise click.UsageError("--watch and --json do not go together: poll status --json instead")
    addr = parse_address(address)
    broker, _ = connect(addr, resolve_authkey())
    if watch:
        from . import watch as watching

        try:
            watching.run(broker.status, format_address(addr), interval)
        finally:
            broker.close()
        return
    info = broker.status()
    broker.close()
    if as_json:
        click.echo(json.dumps(info))
        return
    shared = info.get("shared") or []
    click.echo(f"broker {format_address(addr)}: {info['queued']} queued, {info['running']} running, "
               f"{info['done']} done, {info['failed']} failed; {info['clients']} client(s)"
               + (f"; {len(shared)} shared object(s), {_size(sum(o['size'] for o in shared))}" if shared else "")
               + ("; shutting down" if info["shutting_down"] else ""))
    if not info["workers"]:
        click.echo("no workers")
        return
    click.echo(_worker_table(info["workers"], wide))
    packages = _package_table(info["workers"], wide)
    if packages:
        click.echo("\n" + packages)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _package_table(workers: list[dict], wide: bool) -> str:
    """The installed packages jobs asked for, with each worker's version
    ("-": not installed there): a version that differs stands out."""
    held: dict[tuple[str, str], list[str]] = {}
    for w in workers:
        for dist, version in (w.get("packages") or {}).items():
            held.setdefault((dist, version or "-"), []).append(w["id"])
    rows = [["PACKAGE", "VERSION", "WORKERS"]]
    for (dist, version), ids in sorted(held.items()):
        everyone = len(ids) == len(workers) and len(workers) > 1
        shown = "all" if everyone else ", ".join(ids if wide or len(ids) <= 3 else ids[:3] + [f"+{len(ids) - 3}"])
        rows.append([dist, version, shown])
    if len(rows) == 1:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(2)] + [0]
    return "\n".join(" ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _worker_table(workers: list[dict], wide: bool) -> str:
    """The workers of `status`, one row each: 80 columns, or every field."""
    def seen(w: dict) -> str:
        return f"{max(0.0, time.time() - w['last_seen']):.1f}s"

    columns: list[tuple[str, Callable[[dict], object]]] = [
        ("WORKER", lambda w: w["id"]),
        ("HOST", lambda w: w["host"] if wide or len(w["host"]) <= 12 else w["host"][:11] + "~"),
        ("ADDRESS", lambda w: w.get("address") or "-"),
        ("RUN", lambda w: f"{w['running']}/{w['procs']}"),
        ("QUEUED", lambda w: w["queued"]),
        ("DONE", lambda w: w["done"]),
        ("FAILED", lambda w: w["failed"]),
        ("LOST", lambda w: w["lost"]),
    ]
    if wide:
        columns += [("PID", lambda w: w["pid"]), ("TIMED OUT", lambda w: w["timed_out"]),
                    ("RETRIED", lambda w: w["retried"]), ("VERSION", lambda w: w.get("version") or "-"),
                    ("PYTHON", lambda w: w.get("python") or "-"),
                    ("CLOUDPICKLE", lambda w: w.get("cloudpickle") or "-")]
    columns.append(("SEEN", seen))
    rows = [[name for name, _ in columns]] + [[str(cell(w)) for _, cell in columns] for w in workers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(" ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


@main.command()
@click.argument("address", required=False)
@click.argument("job_id", metavar="[ID]", required=False, type=int)
@click.option("--failed", is_flag=True, help="Only finished jobs that did not succeed.")
@click.option("--running", is_flag=True, help="Only jobs running now.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="Show at most N jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of jobs instead of a table.")
@_tls_options
def jobs(address: str | None, job_id: int | None, failed: bool, running: bool, limit: int, as_json: bool) -> None:
    """Show recent jobs, newest first, and why each ended as it did.

    \b
    ADDRESS: HOST:PORT, HOST (port 5555) or tcp://HOST:PORT of the broker
    [default: $MPQUEUE_ADDRESS, else 127.0.0.1:5555]. The key: $MPQUEUE_AUTHKEY,
    else ~/.config/mpqueue/authkey. With an ID: that job's attempts, and the
    traceback of what it raised.

    \b
    Columns, one row per job (fitting 80 columns):
      ID       the job's id             FUNCTION  its function's name
      STATE    queued, held, running, retrying; or final: done, failed,
               timed_out, lost, cancelled, shutdown
      TRIES    its attempts so far      TIME      how long the last one ran
      WORKER   the worker of the last attempt (the start of its id)
      CAUSE    how it ended: raised TYPE: MESSAGE, timeout, died SIGNAL,
               memory RSS, lost worker, cancelled
    """
    from .transport import connect

    addr = parse_address(address)
    broker, _ = connect(addr, resolve_authkey())
    found = broker.jobs(limit, failed, running, job_id)
    broker.close()
    if job_id is not None and not found:
        raise click.ClickException(f"no job {job_id} at {format_address(addr)}: not in flight, and not among "
                                   "the finished jobs it keeps (--history)")
    if as_json:
        click.echo(json.dumps(found))
    elif job_id is not None:
        click.echo(_job_story(found[0]))
    elif found:
        click.echo(_job_table(found))
    else:
        click.echo("no jobs")


def _job_table(found: list[dict]) -> str:
    """`jobs`: one row per job, cut to 80 columns (the cause gives way)."""
    rows = [["ID", "FUNCTION", "STATE", "TRIES", "TIME", "WORKER", "CAUSE"]]
    for job in found:
        last = job["attempts"][-1] if job["attempts"] else None
        name = job["function"].rpartition(".")[2] or "?"
        rows.append([str(job["id"]), name if len(name) <= 14 else name[:13] + "~", job["state"],
                     str(len(job["attempts"])), _ran(last), (last["worker"] or "-")[:8] if last else "-",
                     job["cause"] or "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = [" ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[6]]) for row in rows]
    return "\n".join(line if len(line) <= 80 else line[:79] + "~" for line in lines)


def _job_story(job: dict) -> str:
    """`jobs ADDRESS ID`: a job, each of its attempts, and the traceback of the last that raised."""
    lines = [f"job {job['id']} {job['function'] or '?'}: {job['state']}"
             + (f", {job['cause']}" if job["cause"] else ""),
             f"  submitted {_when(job['submitted'])}"
             + (f", finished {_when(job['finished'])}" if job["finished"] is not None else "")]
    for n, attempt in enumerate(job["attempts"], 1):
        where = f"worker {attempt['worker'] or '?'}" + (f" on {attempt['host']}" if attempt["host"] else "")
        if attempt["pid"] is not None:
            where += f" pid {attempt['pid']}"
        how = f"{attempt['end']} {attempt['detail']}".rstrip()
        span = f"{_when(attempt['started'])} to {_when(attempt['ended'])} ({_ran(attempt)})"
        lines.append(f"  attempt {n}: {where}, {span}: {how}")
    raised = [a for a in job["attempts"] if a["traceback"]]
    if raised:
        lines.append(f"traceback of attempt {job['attempts'].index(raised[-1]) + 1}:")
        lines.append(raised[-1]["traceback"].rstrip())
    return "\n".join(lines)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"


def _ran(attempt: dict | None) -> str:
    """How long an attempt ran (so far, if it runs): "0.52s", "3m07s", "2h05m"; "-" if unknown."""
    if attempt is None or attempt["started"] is None:
        return "-"
    seconds = max(0.0, (attempt["ended"] or time.time()) - attempt["started"])
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


@main.command()
@click.argument("address", required=False)
@_tls_options
def shutdown(address: str | None) -> None:
    """Stop the cluster: workers finish running jobs and exit, then the broker.

    Jobs still queued fail at their clients with ClusterShutdown. ADDRESS and
    the key are found as for `mpqueue status` [default: $MPQUEUE_ADDRESS, else
    127.0.0.1:5555; $MPQUEUE_AUTHKEY, else ~/.config/mpqueue/authkey].
    """
    from .transport import connect

    addr = parse_address(address)
    _, event = connect(addr, resolve_authkey())
    event.set()
    event.close()
    click.echo(f"shutdown requested at {format_address(addr)}")


def _demo_job(n: int) -> int:
    """Pure-Python CPU work: how many primes below n (trial division)."""
    count = 0
    for k in range(2, n):
        d = 2
        while d * d <= k:
            if k % d == 0:
                break
            d += 1
        else:
            count += 1
    return count


@main.command()
@click.option("--jobs", default=32, show_default=True, help="How many jobs to run.")
@click.option("--size", default=60_000, show_default=True, help="Work per job (primes below SIZE).")
def demo(jobs: int, size: int) -> None:
    """Run a CPU-bound workload on a private local cluster, then on one core, and compare."""
    from .client import Client

    items = [size + i for i in range(jobs)]
    start = time.perf_counter()
    with Client() as client:
        started = time.perf_counter()
        parallel = list(client.map(_demo_job, items, progress=True))
        cluster_time = time.perf_counter() - started
    total_time = time.perf_counter() - start
    started = time.perf_counter()
    with click.progressbar(items, label="one core", file=sys.stderr,
                           hidden=not sys.stderr.isatty()) as bar:
        sequential = [_demo_job(n) for n in bar]
    one_core = time.perf_counter() - started
    assert parallel == sequential, "results differ"
    click.echo(f"{jobs} jobs: {cluster_time:.2f} s on the local cluster "
               f"({total_time:.2f} s with start-up and shutdown), {one_core:.2f} s on one core: "
               f"{one_core / cluster_time:.2f}x faster")

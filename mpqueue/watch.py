"""``mpqueue status --watch``: the cluster, refreshed about once a second.

::

    loop: broker.status() ──▶ screen(status) ──▶ a terminal: the whole screen, redrawn in place
                                            └──▶ anything else: one line per refresh

In a terminal the screen is drawn on the alternate screen with the cursor
hidden, as ``top`` does, and both are given back however the loop ends
(Ctrl-C, the broker gone): the user's shell is as it was. What each field
means: docs/observability.md.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO

#: Enter the alternate screen and hide the cursor; leave it and show it again.
ENTER, LEAVE = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
#: Home, then clear the screen from there: each frame replaces the last.
HOME = "\x1b[H\x1b[J"
WIDTH = 80

COLUMNS = ("WORKER", "HOST", "PID", "PROCS", "CPU%", "RSS", "DONE", "FAILED", "LOST", "SEEN")


def run(status: Callable[[], dict], address: str, interval: float, out: TextIO = sys.stdout) -> None:
    """Show ``status()`` every ``interval`` seconds until Ctrl-C (which ends
    it quietly) or an error (raised once the terminal is given back)."""
    if not out.isatty():
        try:
            while True:
                out.write(line(status(), time.time()) + "\n")
                out.flush()
                time.sleep(interval)
        except KeyboardInterrupt:
            return
    out.write(ENTER)
    try:
        while True:
            rows = shutil.get_terminal_size().lines
            frame = screen(status(), address, time.time())
            if len(frame) > rows:
                frame = frame[:rows - 1] + [f"... {len(frame) - rows + 1} more"]
            out.write(HOME + "\n".join(frame))
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        out.write(LEAVE)
        out.flush()


def screen(info: dict, address: str, now: float) -> list[str]:
    """The lines of one frame, none over 80 columns: the cluster's totals,
    then a row per worker."""
    workers = info["workers"]
    busy, procs = sum(w["running"] for w in workers), sum(w["procs"] for w in workers)
    counters, rate = info["counters"], info["throughput"]
    by_priority = ", ".join(f"{p}: {n}" for p, n in info["by_priority"].items())
    lines = [
        f"mpqueue {address}  {time.strftime('%H:%M:%S', time.localtime(now))}"
        + ("  shutting down" if info["shutting_down"] else ""),
        f"workers {len(workers)}  procs busy {busy}/{procs}  clients {info['clients']}",
        f"queued {info['queued']}" + (f" (priority {by_priority})" if by_priority else "")
        + f"  running {info['running']}",
        f"done {counters['done']}  failed {counters['failed']}  lost {counters['lost']}"
        f"  retried {counters['retried']}  timed out {counters['timed_out']}",
        f"throughput {rate['10s']:.1f}/s over 10 s, {rate['1m']:.1f}/s over 1 min",
        "",
    ]
    rows = [list(COLUMNS)] + [[
        w["id"][:8], w["host"] if len(w["host"]) <= 12 else w["host"][:11] + "~", str(w["pid"]),
        f"{w['running']}/{w['procs']}", "-" if w["cpu"] is None else f"{w['cpu']:.0f}",
        "-" if w["rss"] is None else size(w["rss"]), str(w["done"]), str(w["failed"]), str(w["lost"]),
        f"{max(0.0, now - w['last_seen']):.0f}s",
    ] for w in workers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines += [" ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if not workers:
        lines.append("no workers")
    return [text if len(text) <= WIDTH else text[:WIDTH - 1] + "~" for text in lines]


def line(info: dict, now: float) -> str:
    """One frame as one line, for a pipe or a log."""
    workers = info["workers"]
    counters, rate = info["counters"], info["throughput"]
    return (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))} workers {len(workers)}"
            f" busy {sum(w['running'] for w in workers)}/{sum(w['procs'] for w in workers)}"
            f" queued {info['queued']} running {info['running']} done {counters['done']}"
            f" failed {counters['failed']} lost {counters['lost']}"
            f" rate {rate['10s']:.1f}/s {rate['1m']:.1f}/s")


def size(n: int) -> str:
    """Bytes as a person reads them, in at most 5 characters: 512K, 31M, 1.2G."""
    for unit, shift in (("G", 30), ("M", 20)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n >> 10}K"

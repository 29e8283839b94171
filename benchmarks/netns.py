"""Network namespaces for the benchmarks that measure across hosts
(`crosshost.py`, `scale.py`): made with ``ip netns`` as root, each with its
loopback up; processes started in them by PID; all of it removed at the end.

Traffic only ever goes to loopback or to the namespaces' own addresses.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop(processes: list[subprocess.Popen]) -> None:
    """Ask each process to stop (SIGTERM), then kill what is left, with its children."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            try:
                tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            process.wait()


class Namespaces:
    """The namespaces of one run (named ``PREFIX+random-ROLE``), and the
    processes started in them."""

    def __init__(self, ip: str, env: dict, prefix: str):
        self.ip = ip
        self.env = env
        self.run_id = prefix + uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def ns(self, role: str) -> str:
        return f"{self.run_id}-{role}"

    def sh(self, *args: str) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True, text=True, timeout=10)

    def add(self, role: str) -> str:
        """Make the namespace of ``role``, its loopback up; its name."""
        name = self.ns(role)
        self.sh("netns", "add", name)
        self.namespaces.append(name)
        self.sh("-n", name, "link", "set", "lo", "up")
        return name

    def popen(self, role: str, command: list[str], **kwargs) -> subprocess.Popen:
        """Run ``command`` in a namespace. `ip netns exec` execs it: the
        process's PID is the command's."""
        proc = subprocess.Popen([self.ip, "netns", "exec", self.ns(role), *command], env=self.env, cwd=ROOT,
                                **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process started here, the last first, then delete the
        namespaces (the links in them go with them)."""
        try:
            stop(self.procs[::-1])
        finally:
            for ns in reversed(self.namespaces):
                subprocess.run([self.ip, "netns", "del", ns], capture_output=True)

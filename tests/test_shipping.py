"""The user's own code travels with their jobs; package versions are checked.

The workers here run in another directory than the client, with nothing of
the client's modules on their path: whatever they import of them was shipped.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpqueue import EnvironmentMismatch


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory of the user's own modules, first on the client's path."""
    root = tmp_path / "project"
    write(root / "helpers_here.py", """
        def scale(x):
            return -x
    """)
    write(root / "mylib.py", """
        import helpers_here

        def f(x):
            return helpers_here.scale(x)
    """)
    monkeypatch.syspath_prepend(str(root))
    for name in ("mylib", "helpers_here", "pkg_here", "pkg_here.sub"):
        sys.modules.pop(name, None)
    yield root
    for name in ("mylib", "helpers_here", "pkg_here", "pkg_here.sub"):
        sys.modules.pop(name, None)


def fake_distribution(site: Path, name: str, version: str) -> Path:
    """A ``site`` directory where ``name`` is installed at ``version``: first on
    a worker's PYTHONPATH, it is that worker's version."""
    info = site / f"{name}-{version}.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    write(info / "RECORD", f"{name}.py,,\n")
    write(site / f"{name}.py", "VALUE = 1\n")
    return site


def test_a_local_module_and_what_it_imports_run_on_a_worker_without_copying(cluster, project):
    cluster.start_worker(1)
    import mylib
    client = cluster.client()
    assert list(client.map(mylib.f, range(4))) == [0, -1, -2, -3]
    assert client.submit(lambda x: mylib.f(x) * 2, 5).result(30) == -10     # referenced from a lambda


def test_ship_false_leaves_it_to_the_worker_and_says_so(cluster, project):
    cluster.start_worker(1)
    import mylib
    client = cluster.client(ship=False)
    with pytest.raises(ModuleNotFoundError, match=r"No module named 'mylib' \(on this worker, .*travel"):
        client.submit(mylib.f, 1).result(30)


def test_an_edit_on_the_client_changes_the_result_on_the_worker(cluster, project):
    cluster.start_worker(1)
    import mylib
    client = cluster.client()
    assert client.submit(mylib.f, 3).result(30) == -3
    write(project / "helpers_here.py", """
        def scale(x):
            return x * 100   # edited
    """)
    import helpers_here
    importlib.reload(helpers_here)
    importlib.reload(mylib)
    assert mylib.f(3) == 300
    assert client.submit(mylib.f, 3).result(30) == 300


CLIENT = """
import sys
sys.path.insert(0, sys.argv[2])
import mpqueue, mylib
with mpqueue.Client(sys.argv[1]) as client:
    print(sorted(set(client.map(mylib.version, range(40)))))
"""


def test_two_clients_with_different_versions_of_one_module_each_get_their_own(cluster, tmp_path):
    cluster.start_worker(1)     # one process: it switches between the two versions
    procs = []
    for v in ("one", "two"):
        write(tmp_path / v / "mylib.py", f"""
            import time
            def version(i):
                time.sleep(0.01)
                return {v!r}
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", CLIENT, cluster.address, str(tmp_path / v)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [out.strip() for out, _ in outputs] == ["['one']", "['two']"], outputs


def test_ship_adds_a_directory_a_job_imports_by_name(cluster, tmp_path):
    write(tmp_path / "plugins" / "pkg_here" / "__init__.py", "from .sub import NAME\n")
    write(tmp_path / "plugins" / "pkg_here" / "sub.py", "NAME = 'plugged'\n")
    cluster.start_worker(1)

    def load():
        return importlib.import_module("pkg_here").NAME     # the client never imported it

    client = cluster.client(ship=[str(tmp_path / "plugins" / "pkg_here")])
    assert client.submit(load).result(30) == "plugged"


def test_a_version_mismatch_fails_the_job_naming_both_versions(cluster, project, tmp_path, monkeypatch):
    fake_distribution(tmp_path / "client-site", "fakedist", "2.0")
    fake_distribution(tmp_path / "worker-site", "fakedist", "1.0")
    monkeypatch.syspath_prepend(str(tmp_path / "client-site"))
    importlib.invalidate_caches()
    sys.modules.pop("fakedist", None)
    import fakedist

    from mpqueue import shipping
    shipping._distributions.cache_clear()
    shipping._installed_version.cache_clear()
    cluster.start_worker(1, env={"PYTHONPATH": str(tmp_path / "worker-site")})

    def job():
        return fakedist.VALUE

    client = cluster.client()
    with pytest.raises(EnvironmentMismatch) as caught:
        client.submit(job).result(30)
    assert "fakedist 2.0 on the client, 1.0 on worker host" in str(caught.value)
    assert caught.value.differences == [("fakedist", "2.0", "1.0")]
    with pytest.warns(RuntimeWarning, match="fakedist 2.0 on the client, 1.0"):
        assert cluster.client(on_mismatch="warn").submit(job).result(30) == 1
    assert cluster.client(on_mismatch="ignore").submit(job).result(30) == 1
    workers = cluster.status()["workers"]
    assert workers[0]["packages"]["fakedist"] == "1.0"
    table = cluster.run("status", cluster.address).stdout
    assert "fakedist" in table and "1.0" in table, table
    sys.modules.pop("fakedist", None)


def test_a_job_that_submits_jobs_passes_the_code_it_was_shipped_on(cluster, project):
    write(project / "nested_here.py", """
        import mpqueue, mylib

        def outer(address, x):
            with mpqueue.Client(address) as client:
                return client.submit(mylib.f, x).result(30)
    """)
    cluster.start_worker(2)
    import nested_here
    client = cluster.client()
    assert client.submit(nested_here.outer, cluster.address, 4).result(60) == -4

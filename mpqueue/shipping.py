"""The user's own code, and the versions of their installed packages, travel
with each job.

cloudpickle pickles a function from an importable module by reference: the
worker imports the module by name. For a module of the user's own (their
script's directory, a project on ``sys.path``) that means a copy on every
worker, kept in step by hand, and a stale copy gives wrong answers silently.
So the client ships such modules' source, with the modules and packages they
import from the same places, zipped and named by its hash (a *bundle*):

    client ──submit(…, code={hash: zip})──▶ broker ──code(hash)──▶ worker: ~/.cache/mpqueue/code/HASH.zip
                                                                    child: sys.path[0] = HASH.zip

Each function's pickle goes out wrapped with a header (`protocol.wrap_function`)
naming its bundle and the installed distributions it needs, with the
client's versions. A child puts the bundle first on ``sys.path`` before it
unpickles the function and its arguments, and compares the versions: a
difference fails the job with `EnvironmentMismatch` (or, asked for, warns).
Nothing under site-packages or the standard library is shipped; an
installed distribution (editable ones too) is version-checked instead.

The heavier modules this needs (importlib.metadata, zipfile, ast) are
imported where used: a worker's processes, which import this, start faster,
and a job that ships nothing never pays for them.
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
import sys
import threading
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

from .errors import EnvironmentMismatch, PayloadTooLarge
from .protocol import digest

#: The largest bundle a client ships, zipped.
SHIP_LIMIT = 32 << 20

#: What a child does when a package's version differs from the client's.
ON_MISMATCH = ("raise", "warn", "ignore")

#: Never shipped nor checked: ours, and what the handshake compares already.
_OURS = {"mpqueue", "cloudpickle", "__main__", "builtins", "__mp_main__"}


class Bundle(NamedTuple):
    """Code to ship: a zip of source files, named by its hash."""
    digest: bytes
    zip: bytes
    modules: tuple[str, ...]    # the top-level modules and packages in it


class Header(NamedTuple):
    """What a child needs before it unpickles a function, and its name, which
    the broker shows in the jobs' history without unpickling anything."""
    code: str | None                # hex digest of the function's bundle
    requires: dict[str, str]        # distribution -> the client's version
    on_mismatch: str = "raise"
    name: str = ""                  # "module.qualname" of the function

    def as_dict(self) -> dict:
        return {"code": self.code, "requires": self.requires, "on_mismatch": self.on_mismatch, "name": self.name}

    @classmethod
    def from_dict(cls, info: dict) -> "Header":
        return cls(info.get("code"), dict(info.get("requires") or {}), info.get("on_mismatch", "raise"),
                   str(info.get("name", "")))


def function_name(fn: Callable) -> str:
    """``module.qualname`` of a job's function (``functools.partial`` for a
    partial, the type's for another callable object)."""
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(named, "__module__", None)
    qualname = getattr(named, "__qualname__", "?")
    return f"{module}.{qualname}" if module else qualname


# -- the client: what to ship ------------------------------------------------


class Shipper:
    """Decides, for the modules a job's pickles name, what code to ship and
    which versions to require. One per client.

    ``ship`` is True (ship the user's own modules found), False (ship
    nothing), or a list of module names and directories to ship besides.
    A module is looked at again each time a new function uses it: an edited
    file makes a new bundle (and a module edited but not reloaded in the
    client still ships, as it stands on disk: what the client imports next).
    """

    def __init__(self, ship: bool | Sequence[str] = True, on_mismatch: str = "raise", limit: int = SHIP_LIMIT):
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {', '.join(map(repr, ON_MISMATCH))}, not {on_mismatch!r}")
        if isinstance(ship, str):
            raise TypeError("ship takes True, False or a list of module names and directories")
        self.enabled = ship is not False
        self.extra = [] if isinstance(ship, bool) else [_explicit(entry) for entry in ship]
        self.on_mismatch = on_mismatch
        self.limit = limit
        self._lock = threading.Lock()
        self._sources: dict[str, tuple[tuple[int, int], bytes, frozenset[str]]] = {}   # path -> (stat, text, imports)
        self._zips: dict[tuple, Bundle] = {}    # by its files and their stat

    def header(self, modules: Iterable[str]) -> tuple[Header, Bundle | None]:
        """The header for a function whose pickles name ``modules``, and the
        bundle it needs (None: nothing to ship)."""
        try:
            return self._header(modules)
        except OSError as e:    # a module's file gone or unreadable since it was imported
            raise OSError(e.errno, f"cannot read your code to ship it with the job ({e.strerror}); "
                          "Client(ship=False) ships nothing", e.filename) from None

    def _header(self, modules: Iterable[str]) -> tuple[Header, Bundle | None]:
        with self._lock:
            local: dict[str, list[tuple[str, str]]] = {}    # top-level name -> [(file, name in the zip)]
            installed: set[str] = set()
            todo = [m.partition(".")[0] for m in modules if m]
            if self.enabled:
                for top, files in self.extra:
                    local[top] = files
                    todo.extend(self._imports(files))
            seen: set[str] = set(local)
            while todo:
                top = todo.pop()
                if top in seen:
                    continue
                seen.add(top)
                kind, files = _classify(top)
                if kind == "installed":
                    installed.add(top)
                elif kind == "local" and self.enabled:
                    local[top] = files
                    todo.extend(self._imports(files))
            requires = _versions(installed)
            bundle = self._bundle(local) if local else None
        return Header(bundle.digest.hex() if bundle else None, requires, self.on_mismatch), bundle

    def _imports(self, files: list[tuple[str, str]]) -> list[str]:
        """The top-level names the files import, where the client has them
        imported too (an optional dependency it lacks is no requirement)."""
        names: set[str] = set()
        for path, _ in files:
            names |= self._read(path)[1]
        return [n for n in names if n in sys.modules]

    def _read(self, path: str) -> tuple[bytes, frozenset[str]]:
        """A file's text and the names it imports; ``BUNDLE!NAME`` is a file of
        a bundle this process was shipped."""
        st = os.stat(path.partition("!")[0])
        key = (st.st_mtime_ns, st.st_size)
        cached = self._sources.get(path)
        if cached is None or cached[0] != key:
            if "!" in path:
                import zipfile
                bundle, _, name = path.partition("!")
                with zipfile.ZipFile(bundle) as zf:
                    text = zf.read(name)
            else:
                with open(path, "rb") as f:
                    text = f.read()
            cached = self._sources[path] = (key, text, _imported_names(text, path))
        return cached[1], cached[2]

    def _bundle(self, local: dict[str, list[tuple[str, str]]]) -> Bundle:
        files = sorted({f for found in local.values() for f in found}, key=lambda f: f[1])
        for path, _ in files:
            self._read(path)    # stat each: an edited file is read again
        seen = tuple((path, arcname, self._sources[path][0]) for path, arcname in files)
        if seen in self._zips:
            return self._zips[seen]
        import io
        import zipfile
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for path, arcname in files:
                info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))    # the same files, the same hash
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, self._sources[path][1])
        data = buffer.getvalue()
        if len(data) > self.limit:
            raise PayloadTooLarge(
                f"the code to ship with this job ({', '.join(sorted(local))}) zips to {len(data) / 2**20:.1f} MiB, "
                f"over the limit of {self.limit / 2**20:.0f} MiB: install it on the workers instead (pip install), "
                "and pass Client(ship=False)", size=len(data), limit=self.limit)
        bundle = self._zips[seen] = Bundle(digest(data), data, tuple(sorted(local)))
        return bundle


def _classify(top: str) -> tuple[str, list[tuple[str, str]]]:
    """Whether a top-level module is the standard library's or ours
    ("skip"), an installed distribution's ("installed"), the user's own
    ("local", with its files), or not found here ("skip")."""
    if top in _OURS or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "skip", []
    if top in _distributions():
        return "installed", []
    module = sys.modules.get(top)
    spec = getattr(module, "__spec__", None)
    if spec is None:
        import importlib.util
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return "skip", []
    if spec is None:
        return "skip", []
    if spec.origin not in (None, "namespace") and spec.has_location:
        origin = os.path.abspath(spec.origin)
        if origin.startswith(os.path.join(cache_dir(), "")):
            # Code shipped to this worker, used by a job that submits jobs: it travels on.
            bundle = origin[:origin.index(".zip") + 4]
            return "local", [(f"{bundle}!{name}", name) for name in _zip_names(bundle)
                             if name.split("/")[0].removesuffix(".py") == top]
        if _under_installed(origin) or not origin.endswith(".py"):
            return "skip", []       # the standard library, or an extension module: cannot ship it
        if os.path.basename(origin) == "__init__.py":
            return "local", _package_files(os.path.dirname(origin), top)
        return "local", [(origin, top + ".py")]
    locations = [os.path.abspath(p) for p in (spec.submodule_search_locations or ())]
    if locations and not any(_under_installed(p) for p in locations):
        return "local", [f for p in locations for f in _package_files(p, top)]    # a namespace package
    return "skip", []


def _zip_names(bundle: str) -> list[str]:
    import zipfile
    with zipfile.ZipFile(bundle) as zf:
        return zf.namelist()


def _explicit(entry: str) -> tuple[str, list[tuple[str, str]]]:
    """One entry of ``ship=``: a directory (shipped as a package if it is one,
    else as a ``sys.path`` entry: what is in it is importable), or the name of
    a module the client can import."""
    path = os.path.abspath(os.path.expanduser(entry))
    if os.path.isdir(path):
        name = os.path.basename(path)
        if os.path.exists(os.path.join(path, "__init__.py")):
            return name, _package_files(path, name)
        return name, _package_files(path, "")
    if entry.endswith(".py") and os.path.isfile(path):
        name = os.path.basename(path)[:-3]
        return name, [(path, name + ".py")]
    kind, files = _classify(entry.partition(".")[0])
    if kind != "local":
        raise ValueError(f"ship={entry!r}: not a directory, nor a module of your own that this process can "
                         "import (installed packages are not shipped: install them on the workers)")
    return entry.partition(".")[0], files


def _package_files(directory: str, prefix: str) -> list[tuple[str, str]]:
    """Every .py file under ``directory``, named in the zip under ``prefix``."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                files.append((path, os.path.join(prefix, os.path.relpath(path, directory)).lstrip(os.sep)))
    return files


def _imported_names(text: bytes, path: str) -> frozenset[str]:
    import ast
    try:
        tree = ast.parse(text, path)
    except (SyntaxError, ValueError):
        return frozenset()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return frozenset(names)


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    import sysconfig
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    return tuple(os.path.join(os.path.abspath(r), "") for r in roots)


def _under_installed(path: str) -> bool:
    return path.startswith(_installed_roots())


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Top-level module name -> the installed distributions providing it."""
    import importlib.metadata
    return importlib.metadata.packages_distributions()


def _versions(tops: set[str]) -> dict[str, str]:
    requires = {}
    for top in tops:
        for dist in _distributions().get(top, ())[:1]:
            version = _installed_version(dist)
            if version is not None:
                requires[dist] = version
    return requires


@functools.lru_cache(maxsize=None)
def _installed_version(dist: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the worker: keeping bundles ----------------------------------------------


def cache_dir() -> str:
    """Where a host keeps the bundles its workers fetched, one file per hash."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpqueue", "code")


def bundle_path(code: str) -> str:
    return os.path.join(cache_dir(), f"{code}.zip")


def store(code: str, data: bytes) -> None:
    """Keep a fetched bundle, if it is what its name says."""
    if digest(data).hex() != code:
        raise ValueError(f"the bundle fetched for {code} does not match its hash")
    path = bundle_path(code)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.part"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


# -- the child: using them -------------------------------------------------------

_active: str | None = None      # the bundle on sys.path
_provides: dict[str, set[str]] = {}     # bundle path -> its top-level names


def activate(code: str | None) -> bool:
    """Make ``code``'s bundle (None: none) the one this process imports from.

    Modules a bundle provides are dropped from ``sys.modules`` when it comes
    and when it goes, so that neither another bundle's copy nor a copy found
    on the worker's own path stands in for them. Returns whether anything
    changed: functions unpickled before then refer to other modules.
    """
    global _active
    path = None if code is None else bundle_path(code)
    if path == _active:
        return False
    if path is not None and not os.path.exists(path):
        raise ImportError(f"the code shipped with this job ({os.path.basename(path)}) did not reach this "
                          f"worker ({socket.gethostname()}): see the worker's log")
    for old in (_active, path):
        if old is None:
            continue
        tops = _provides.get(old)
        if tops is None:
            import zipfile
            with zipfile.ZipFile(old) as zf:
                tops = _provides[old] = {n.split("/")[0].removesuffix(".py") for n in zf.namelist()}
        for name in [n for n in sys.modules if n.partition(".")[0] in tops]:
            del sys.modules[name]
    if _active is not None:
        while _active in sys.path:
            sys.path.remove(_active)
        sys.path_importer_cache.pop(_active, None)
    if path is not None:
        sys.path.insert(0, path)
    importlib.invalidate_caches()
    _active = path
    return True


def check(header: Header) -> str | None:
    """Compare the client's versions with this host's: on a difference,
    raise `EnvironmentMismatch` or return the warning to give, as asked."""
    if header.on_mismatch == "ignore" or not header.requires:
        return None
    differences = []
    for dist, wanted in sorted(header.requires.items()):
        have = _installed_version(dist)
        if have != wanted:
            differences.append((dist, wanted, have))
    if not differences:
        return None
    said = "; ".join(f"{dist} {wanted} on the client, {have or 'not installed'} on worker host {socket.gethostname()}"
                     for dist, wanted, have in differences)
    if header.on_mismatch == "warn":
        return said
    raise EnvironmentMismatch(
        f"{said}: install the client's version on the worker, or pass Client(on_mismatch='warn')",
        differences=differences, host=socket.gethostname())


def installed(dists: Iterable[str]) -> dict[str, str | None]:
    """This host's versions of ``dists``: what `mpqueue status` shows per worker."""
    return {dist: _installed_version(dist) for dist in dists}

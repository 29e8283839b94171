"""What a client ships and requires, and how a process takes it in (`shipping`)."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from mpqueue import EnvironmentMismatch, PayloadTooLarge, shipping
from mpqueue.shipping import Header, Shipper

CLICK = importlib.metadata.version("click")     # a dependency of ours: installed wherever tests run


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "pkg_u").mkdir(parents=True)
    (root / "pkg_u" / "__init__.py").write_text("from . import inner\n")
    (root / "pkg_u" / "inner.py").write_text("import json\nVALUE = 1\n")
    (root / "top_u.py").write_text(
        "import pkg_u\nimport click\ntry:\n    import not_installed_anywhere\nexcept ImportError:\n    pass\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    names = ("top_u", "pkg_u", "pkg_u.inner")
    for name in names:
        sys.modules.pop(name, None)
    import click  # noqa: F401  (installed, a dependency of ours: required, not shipped)
    import top_u  # noqa: F401
    yield root
    for name in names:
        sys.modules.pop(name, None)


def names(bundle) -> list[str]:
    import io
    import zipfile
    return sorted(zipfile.ZipFile(io.BytesIO(bundle.zip)).namelist())


def test_standard_library_and_mpqueue_are_neither_shipped_nor_required():
    header, bundle = Shipper().header({"json.decoder", "builtins", "mpqueue.client", "__main__", "os"})
    assert bundle is None and header.requires == {} and header.code is None


def test_an_installed_package_is_required_at_its_version_not_shipped():
    header, bundle = Shipper().header({"click"})
    assert bundle is None and header.requires == {"click": CLICK}


def test_a_local_module_ships_with_what_it_imports_from_the_same_place(project):
    header, bundle = Shipper().header({"top_u"})
    assert names(bundle) == ["pkg_u/__init__.py", "pkg_u/inner.py", "top_u.py"]
    assert header.code == bundle.digest.hex()
    assert set(header.requires) == {"click"}      # the module it failed to import is no requirement


def test_the_bundle_is_named_by_its_content(project):
    first = Shipper().header({"top_u"})[1]
    assert Shipper().header({"top_u"})[1].digest == first.digest
    (project / "pkg_u" / "inner.py").write_text("import json\nVALUE = 2  # edited\n")
    assert Shipper().header({"top_u"})[1].digest != first.digest


def test_ship_false_ships_nothing_but_still_requires_versions(project):
    header, bundle = Shipper(ship=False).header({"top_u", "click"})
    assert bundle is None and "click" in header.requires


def test_ship_names_a_directory_or_module_to_add(project, tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "plugin_u.py").write_text("X = 1\n")
    _, bundle = Shipper(ship=[str(tmp_path / "extra"), "pkg_u"]).header(set())
    assert names(bundle) == ["pkg_u/__init__.py", "pkg_u/inner.py", "plugin_u.py"]
    with pytest.raises(ValueError, match="installed packages are not shipped"):
        Shipper(ship=["click"])
    with pytest.raises(TypeError):
        Shipper(ship="pkg_u")       # type: ignore[arg-type]


def test_a_bundle_over_the_limit_says_what_to_do(project):
    with pytest.raises(PayloadTooLarge, match=r"top_u\).*pip install.*ship=False"):
        Shipper(limit=100).header({"top_u"})


def test_a_process_takes_a_bundle_in_and_lets_it_go(project, tmp_path):
    bundles = []
    for value in (10, 20):
        (project / "pkg_u" / "inner.py").write_text(f"VALUE = {value}\n")
        _, bundle = Shipper().header({"pkg_u"})
        shipping.store(bundle.digest.hex(), bundle.zip)
        bundles.append(bundle.digest.hex())
    with pytest.raises(ValueError, match="does not match"):
        shipping.store(bundles[0], b"not it")
    try:
        sys.modules.pop("pkg_u", None)
        sys.modules.pop("pkg_u.inner", None)
        assert shipping.activate(bundles[0])
        import pkg_u
        assert pkg_u.inner.VALUE == 10 and ".zip" in pkg_u.__file__
        assert not shipping.activate(bundles[0])
        assert shipping.activate(bundles[1])
        assert "pkg_u" not in sys.modules
        import pkg_u as again
        assert again.inner.VALUE == 20
        assert shipping.activate(None) and "pkg_u" not in sys.modules
        with pytest.raises(ImportError, match="did not reach this worker.*log"):
            shipping.activate("0" * 32)
    finally:
        shipping.activate(None)


def test_versions_are_compared_as_asked():
    same = Header(None, {"click": CLICK})
    assert shipping.check(same) is None
    other = {"click": "0.0.1", "no-such-dist-u": "1.0"}
    with pytest.raises(EnvironmentMismatch, match="click 0.0.1 on the client, .* on worker host") as caught:
        shipping.check(Header(None, other))
    assert ("no-such-dist-u", "1.0", None) in caught.value.differences
    assert "not installed" in shipping.check(Header(None, other, "warn"))
    assert shipping.check(Header(None, other, "ignore")) is None
    with pytest.raises(ValueError, match="on_mismatch"):
        Shipper(on_mismatch="loud")


def test_a_header_travels_in_front_of_the_pickle():
    from mpqueue.protocol import unwrap_function, wrap_function
    header = Header("ab" * 16, {"click": "1.0"}, "warn")
    blob = wrap_function(header.as_dict(), b"\x80\x05pickle")
    found, pickled = unwrap_function(blob)
    assert Header.from_dict(found) == header and pickled == b"\x80\x05pickle"
    assert unwrap_function(b"\x80\x05bare") == ({}, b"\x80\x05bare")     # an older journal's

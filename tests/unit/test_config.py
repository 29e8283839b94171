"""Addresses, the key file and the environment: mistakes that explain themselves."""

from __future__ import annotations

import pytest

from mpqueue import config
from mpqueue.errors import ConfigError


@pytest.mark.parametrize("given, expected", [
    ("10.0.0.5:6000", ("10.0.0.5", 6000)),
    ("10.0.0.5", ("10.0.0.5", 5555)),                  # the port is the default
    ("tcp://10.0.0.5:6000", ("10.0.0.5", 6000)),       # as other tools write it
    ("tcp://10.0.0.5", ("10.0.0.5", 5555)),
    ("broker.example:7", ("broker.example", 7)),
    ("[::1]:7", ("::1", 7)),
    ("[::1]", ("::1", 5555)),
    (":6000", ("127.0.0.1", 6000)),
])
def test_address_forms(given, expected):
    assert config.parse_address(given) == expected


@pytest.mark.parametrize("given", ["host:port", "host:99999", "tcp://host:1/path", "host:"])
def test_a_bad_address_says_what_it_takes(given):
    with pytest.raises(ConfigError, match=r"is not HOST:PORT \(or HOST, for port 5555\)"):
        config.parse_address(given)


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MPQUEUE_AUTHKEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = tmp_path / "mpqueue" / "authkey"
    path.parent.mkdir()
    path.write_text("secret\n")
    return path


def test_a_key_file_others_can_read_is_refused_like_ssh(key_file):
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"readable by others \(mode 0644\): run `chmod 600 {key_file}`"):
        config.resolve_authkey()
    key_file.chmod(0o600)
    assert config.resolve_authkey() == b"secret"


def test_no_key_file_says_to_copy_the_brokers(key_file):
    key_file.unlink()
    with pytest.raises(ConfigError, match=r"copy the key file from the broker's host \(`scp -p"):
        config.resolve_authkey()


def test_an_unknown_mpqueue_variable_is_warned_of_once(monkeypatch, capsys):
    monkeypatch.setattr(config, "_warned_unknown", False)
    monkeypatch.setenv("MPQUEUE_ADRESS", "10.0.0.5:5555")
    monkeypatch.setenv("MPQUEUE_HEARTBEAT_TIMEOUT", "5")       # a setting: not warned of
    config.warn_unknown_variables()
    config.warn_unknown_variables()
    assert capsys.readouterr().err == (
        "mpqueue: ignoring MPQUEUE_ADRESS, which is no setting of mpqueue's: did you mean MPQUEUE_ADDRESS?\n")


# -- unreachable brokers: what to check (no traffic: the errors are made here) ----------

def test_a_refused_connection_to_another_host_hints_at_host():
    from mpqueue.transport import _unreachable
    error = _unreachable(("10.0.0.5", 5555), ConnectionRefusedError(111, "Connection refused"))
    assert str(error) == ("cannot reach the broker at 10.0.0.5:5555: Connection refused; is a broker "
                          "listening on 10.0.0.5? `mpqueue broker` listens on 127.0.0.1 only, unless "
                          "started with --host")
    assert "--host" not in str(_unreachable(("127.0.0.1", 5555), ConnectionRefusedError(111, "refused")))


def test_a_timeout_hints_at_a_firewall():
    from mpqueue.transport import _unreachable
    assert str(_unreachable(("10.0.0.5", 5555), TimeoutError("timed out"))).endswith(
        "nothing answered: a firewall may be dropping port 5555")


def test_a_name_that_does_not_resolve_fails_at_once_but_not_in_a_reconnect():
    import socket
    import time

    from mpqueue.transport import _unreachable, reach_broker
    calls = []

    def first_call():
        calls.append(1)
        raise _unreachable(("nowhere", 5555), socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    started = time.monotonic()
    with pytest.raises(Exception, match="Name or service not known"):
        reach_broker(("nowhere", 5555), first_call, wait=30)
    assert len(calls) == 1 and time.monotonic() - started < 1
    with pytest.raises(Exception, match="after 0 s"):
        reach_broker(("nowhere", 5555), first_call, wait=0.2, reconnecting=True)
    assert len(calls) > 2       # a resolver down a moment: tried again

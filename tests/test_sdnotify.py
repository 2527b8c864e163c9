"""sd_notify against real AF_UNIX datagram sockets (a path one and an abstract one)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from ramp_dispatcher.sdnotify import SystemdNotifier


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    address = str(tmp_path / "notify.sock")
    sock = _receiver(address)
    yield sock, address
    sock.close()


def test_messages_reach_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    n = SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "60000000"})
    assert n.enabled
    assert n.watchdog_interval() == 30.0

    assert n.ready()
    assert _recv(sock) == ["READY=1"]
    assert n.status("waiting 3, running 2\ndone 10")  # a newline would end the value
    assert _recv(sock) == ["STATUS=waiting 3, running 2 done 10"]
    assert n.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]
    assert n.ready(status="serving iris")
    assert _recv(sock) == ["READY=1", "STATUS=serving iris"]
    assert n.reloading()
    lines = _recv(sock)
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    assert n.stopping("draining")
    assert _recv(sock) == ["STOPPING=1", "STATUS=draining"]
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"ramp-dispatcher-test-{uuid.uuid4().hex}"
    sock = _receiver("\0" + name)
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        assert n.ready()
        assert _recv(sock) == ["READY=1"]
        assert n.status("ok")
        assert _recv(sock) == ["STATUS=ok"]
        # no WATCHDOG_USEC: systemd expects no pings, none are sent
        assert n.watchdog_interval() is None
        assert not n.watchdog()
        n.close()
    finally:
        sock.close()


def test_watchdog_pid_must_be_ours(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    ours = SystemdNotifier(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert ours.watchdog_interval() == 5.0
    assert ours.watchdog()
    assert _recv(sock) == ["WATCHDOG=1"]

    # variables inherited from a parent that was the watched process
    other = SystemdNotifier(
        {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval() is None
    assert not other.watchdog()
    for bad in ("", "0", "-5", "soon"):
        assert SystemdNotifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": bad}).watchdog_interval() is None


def test_disabled_outside_systemd() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}, {"NOTIFY_SOCKET": "@"}):
        n = SystemdNotifier(env)
        assert not n.enabled
        assert not n.ready() and not n.status("x") and not n.watchdog() and not n.stopping()


def test_default_environment_is_os_environ(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[socket.socket, str]
) -> None:
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = SystemdNotifier()
    assert n.ready()
    assert _recv(sock) == ["READY=1"]


def test_send_failure_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="ramp_dispatcher.sdnotify")
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock"), "WATCHDOG_USEC": "1000"})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert "sd_notify" in caplog.text and "failed" in caplog.text

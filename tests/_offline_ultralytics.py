"""Fixtures that keep ultralytics offline in the tests: a local font for its dataset check, and
sockets that refuse (and record) every connection. Import both names into a test module to use them."""

from __future__ import annotations

import socket
import traceback

import pytest


@pytest.fixture(scope="module", autouse=True)
def local_font():
    """ultralytics' dataset check wants Arial.ttf in its config folder (else downloads it): give it a local font."""
    import shutil

    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    target = USER_CONFIG_DIR / "Arial.ttf"
    if not target.exists():
        USER_CONFIG_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(font_manager.findfont("DejaVu Sans"), target)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails, and is recorded."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append((args[:2], "".join(traceback.format_stack(limit=30))))
        raise OSError("network access is blocked in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert not attempts, f"ultralytics tried to reach the network: {attempts}"

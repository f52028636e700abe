"""The unit tier is hermetic: no Redis, Triton, service process or socket.

A unit test that opens an IP socket fails here instead of quietly becoming
an integration test (those live in tests/integration/). Only Python-level
sockets are caught (redis-py, asyncio's connections, http clients); grpc's C
core opens its own, which is why the servicer adapters are tested through
grpcio-testing and never a channel.
"""

from __future__ import annotations

import socket

import pytest

_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _refuse(original):
    def guarded(self, *args, **kwargs):
        if self.family in _IP_FAMILIES:
            raise AssertionError("a unit test opened an IP socket: it belongs in tests/integration/")
        return original(self, *args, **kwargs)

    return guarded


@pytest.fixture(autouse=True)
def no_ip_sockets(monkeypatch):
    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, _refuse(getattr(socket.socket, name)))

"""Loopback ports for the servers that the end-to-end tests start: one allocator for the
whole session, so that no two servers are handed the same port."""

from __future__ import annotations

import contextlib
import socket

# Ports handed out in this session: a server binds its ports only once it starts, so a later
# pick must not return one that an earlier pick handed out and nothing has bound yet.
_HANDED_OUT: set[int] = set()


def free_port(span: int = 1) -> int:
    """A free port on loopback, the first of `span` consecutive free ones (a vLLM event
    publisher's replay endpoint is the port after its events one), that this session has not
    handed out before."""
    while True:
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            ports = range(port, port + span)
            if port + span > 65536 or any(p in _HANDED_OUT for p in ports):
                continue
            try:
                for p in ports[1:]:
                    held.enter_context(socket.socket()).bind(("127.0.0.1", p))
            except OSError:
                continue
        _HANDED_OUT.update(ports)
        return port

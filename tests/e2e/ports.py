"""Loopback ports for the servers that the end-to-end tests start: one allocator for the
whole session, so that no two servers are handed the same port.

A port is checked free and then handed to a server that binds it seconds later. A port from
the kernel's ephemeral range could be taken in between by any outgoing connection on the
machine (vLLM's own engine sockets, HTTP clients), so ports are picked below that range,
where the kernel never hands out a port by itself."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

# Ports handed out in this session: a server binds its ports only once it starts, so a later
# pick must not return one that an earlier pick handed out and nothing has bound yet.
_HANDED_OUT: set[int] = set()

# Where picks start when the ephemeral range leaves room below it (privileged and the usual
# well-known service ports stay out).
_LOWEST = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidates(reach: int) -> range:
    """Where a pick may start so that it and the `reach - 1` ports above it stay in bounds."""
    low, high = _ephemeral_range()
    if low - reach - _LOWEST >= 1000:
        return range(_LOWEST, low - reach + 1)
    # No room below: above the range, or the range itself as the last resort.
    if 65536 - reach - high >= 1000:
        return range(high + 1, 65536 - reach + 1)
    return range(1024, 65536 - reach + 1)


def _all_free(ports: list[int]) -> bool:
    with contextlib.ExitStack() as held:
        try:
            for p in ports:
                # The wildcard address: a server that binds `*:p` must find p free on every
                # interface, and a bind here also fails where a loopback listener holds p.
                held.enter_context(socket.socket()).bind(("0.0.0.0", p))
        except OSError:
            return False
    return True


def free_port(span: int = 1, offset: int = 0) -> int:
    """A free port, the first of `span` consecutive free ones (a vLLM event publisher's replay
    endpoint is the port after its events one), below the kernel's ephemeral range and not
    handed out before in this session. With an `offset`, the port that far above it is free
    too and handed out with it (a server that derives a second port from the first)."""
    candidates = _candidates(span + offset)
    for _ in range(10_000):
        port = random.choice(candidates)
        ports = [*range(port, port + span), *([port + offset] if offset else [])]
        if any(p in _HANDED_OUT for p in ports) or not _all_free(ports):
            continue
        _HANDED_OUT.update(ports)
        return port
    raise RuntimeError(f"no {span} consecutive free ports (and one {offset} above) in {candidates}")

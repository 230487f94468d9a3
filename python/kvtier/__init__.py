"""kvtier: KV-cache tiering for LLM inference engines.

The engine side of kvtier. :class:`Client` talks to the node agent (``kvagent node``) over its
Unix socket and maps the agent's shared arena, so blocks move by one copy between the engine's
memory and an arena slot. All protocol logic and every copy run in Rust (``kvtier._native``),
with the GIL released.
"""

from kvtier._native import (
    TIER_DISK,
    TIER_HOST,
    TIER_MISS,
    TIER_OBJECT,
    TIER_PEER,
    AgentTimeout,
    AgentUnavailable,
    Client,
    CopyEngine,
    DeviceUnavailable,
    KvtierError,
    Leases,
    Reservation,
    StaleHandle,
    check_device,
    namespace,
    probe_devices,
    write_pages_many,
)

__all__ = [
    "TIER_DISK",
    "TIER_HOST",
    "TIER_MISS",
    "TIER_OBJECT",
    "TIER_PEER",
    "AgentTimeout",
    "AgentUnavailable",
    "Client",
    "CopyEngine",
    "DeviceUnavailable",
    "KvtierError",
    "Leases",
    "Reservation",
    "StaleHandle",
    "check_device",
    "namespace",
    "probe_devices",
    "write_pages_many",
]

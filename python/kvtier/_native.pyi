"""Types of the Rust extension ``kvtier._native``."""

TIER_MISS: int
TIER_HOST: int
TIER_DISK: int
TIER_PEER: int
TIER_OBJECT: int

class KvtierError(Exception):
    """A call to the kvtier agent failed."""

class AgentUnavailable(KvtierError):
    """No kvtier agent answers at the socket: recompute."""

class AgentTimeout(KvtierError):
    """The kvtier agent did not answer in time."""

class DeviceUnavailable(KvtierError):
    """No copy engine for a device: its driver, library or device is missing."""

class StaleHandle(KvtierError):
    """A lease or reservation of a connection that has ended."""

# A layer's pages: (address of block 0's page, bytes between blocks, bytes of one page).
Layer = tuple[int, int, int]

class CopyEngine:
    """Copies pages between an engine's KV cache and arena slots on one device ("cpu",
    "cuda:N", "hip:N"); raises :class:`DeviceUnavailable` with the reason when it cannot."""

    def __init__(self, device: str) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def asynchronous(self) -> bool: ...
    def describe(self) -> str: ...

def check_device(device: str) -> tuple[bool, str]: ...
def probe_devices() -> list[tuple[str, bool, str]]: ...

class Leases:
    """Blocks pinned by :meth:`Client.acquire`, readable until released."""

    def tiers(self) -> list[int]: ...
    def prefix_len(self) -> int: ...
    def load_pages(
        self,
        block_ids: list[int],
        layers: list[Layer],
        start: int = 0,
        engine: CopyEngine | None = None,
        stream: int = 0,
        stream_waits: bool = True,
    ) -> list[int]: ...
    def wait(self) -> None: ...
    def release(self, client: Client) -> None: ...

class Reservation:
    """Slots reserved by :meth:`Client.reserve_pages`, filled, then committed or aborted."""

    def reserved(self) -> int: ...
    def outcomes(self) -> list[str]: ...
    def write_pages(
        self,
        block_ids: list[int],
        layers: list[Layer],
        offset: int = 0,
        engine: CopyEngine | None = None,
        stream: int = 0,
    ) -> None: ...
    def wait(self) -> None: ...

class Client:
    """A connection to the node agent."""

    def __init__(
        self,
        socket: str | None = None,
        timeout_ms: int = 1000,
        name: str | None = None,
        lazy: bool = True,
    ) -> None: ...
    @property
    def socket(self) -> str: ...
    @property
    def connected(self) -> bool: ...
    def disconnect(self) -> None: ...
    def lookup(self, ns: bytes, hashes: list[bytes]) -> list[int]: ...
    def save(self, ns: bytes, hashes: list[bytes], data: list[bytes]) -> list[str]: ...
    def load(self, ns: bytes, hashes: list[bytes]) -> list[bytes | None]: ...
    def save_pages(
        self,
        ns: bytes,
        hashes: list[bytes],
        block_ids: list[int],
        layers: list[Layer],
        engine: CopyEngine | None = None,
        stream: int = 0,
    ) -> list[str]: ...
    def load_pages(
        self,
        ns: bytes,
        hashes: list[bytes],
        block_ids: list[int],
        layers: list[Layer],
        engine: CopyEngine | None = None,
        stream: int = 0,
    ) -> list[int]: ...
    def reserve_pages(self, ns: bytes, hashes: list[bytes], block_bytes: int) -> Reservation: ...
    def commit(self, reservation: Reservation) -> list[str]: ...
    def abort(self, reservation: Reservation) -> None: ...
    def register_arena(self, engine: CopyEngine) -> None: ...
    def acquire(self, ns: bytes, hashes: list[bytes]) -> Leases: ...
    def release(self, leases: Leases) -> None: ...
    def announce(self, ns: bytes, model: str) -> None: ...
    def pull(self, peer: str, ns: bytes, hashes: list[bytes], ticket: int | None = None) -> list[bool]: ...
    def hold(self, ns: bytes, hashes: list[bytes], ticket: int | None = None) -> tuple[list[int], int]: ...
    def unhold(self, ns: bytes, ticket: int) -> int: ...
    def stats(self) -> str: ...

def namespace(
    model: str,
    *,
    revision: str | None = None,
    kv_dtype: str | None = None,
    kv_layout: str | None = None,
    block_size: int | None = None,
    tp_rank: int = 0,
    tp_world: int | None = None,
    pp_stage: int | None = None,
    kv_group: int | None = None,
    lora: str | None = None,
    tenant: str | None = None,
    cache_salt: str | None = None,
) -> bytes: ...
def write_pages_many(
    reservations: list[Reservation],
    block_ids: list[list[int]],
    layers: list[Layer],
    offset: int = 0,
    engine: CopyEngine | None = None,
    stream: int = 0,
) -> None:
    """:meth:`Reservation.write_pages` for several reservations of one client in one batch
    (one kernel launch on a device): ``block_ids[k]`` are the engine blocks of
    ``reservations[k]``."""

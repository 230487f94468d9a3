"""kvtier's KV connector for vLLM (``KVConnectorBase_V1``).

Load it with::

    kv_transfer_config = {
        "kv_connector": "KvTierConnector",
        "kv_connector_module_path": "kvtier.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kvtier/agent.sock"},
    }

Every full block a request computes is saved to the node agent, keyed by vLLM's own
``request.block_hashes`` under a namespace of everything that makes equal hashes mean different
bytes (model, dtype, KV layout and page size, block size, TP rank and world, pipeline stage, KV
group, LoRA, cache salt). A new request asks the agent how many of its leading blocks it holds
beyond vLLM's own prefix cache, and claims only blocks pinned in the agent's arena, which stay
readable even if the agent dies before the load:

- blocks already in host memory are pinned at once and copied into the request's blocks before
  the forward pass (a synchronous load);
- blocks that must first be promoted from a lower tier (disk), or pulled from another node's
  agent that the cluster index says holds them (cross-node reuse), are brought up by a background
  thread while vLLM schedules other requests (the count is "not known yet" meanwhile), then
  pinned and loaded asynchronously: the copy runs beside the forward pass and the request
  resumes when ``get_finished`` reports it.

Saves are layer by layer: the blocks that become full in a step get arena slots at the step's
first attention layer, each layer's pages are copied as soon as that layer has written them,
and the slots are published after the forward pass. A request whose load failed in the step
saves nothing of that step (its new blocks were computed on wrong KV). Copies run in Rust
(``kvtier._native``), off the GIL.

``kv_connector_extra_config`` keys (all optional):

- ``socket``: the agent's socket (default ``$KVTIER_SOCKET``, else ``/run/kvtier/agent.sock``);
- ``timeout_ms``: bound of each call to the agent (default 1000);
- ``save``: save computed blocks (default true, false for a ``kv_consumer``: a decode engine
  receives KV);
- ``load``: load hits (default true);
- ``min_prefix_tokens``: ignore hits shorter than this (default one block);
- ``peer_address``: the address a decode engine pulls this engine's blocks from (default: the
  agent's advertised ``peer.address``);
- ``pull_timeout_ms``: bound of a pull from a prefill engine's agent (default 10000);
- ``pd_params``: the ``kv_transfer_params`` a producer returns: ``vllm`` (default) in the shape
  vLLM's disaggregation proxies pass along (``do_remote_prefill``, ``remote_host``,
  ``remote_port``, ``remote_num_tokens``... and kvtier's own keys), ``kvtier`` kvtier's own keys
  alone (``remote_agent``, ``remote_namespace``, ``remote_block_hashes``), for a MultiConnector
  in which another connector (NIXL) returns the shared ones, or ``off``: no part in
  disaggregation.

Pipeline parallelism is refused at start: each stage holds its own layers of a block.

Prefill/decode disaggregation follows vLLM's convention (``kv_role`` ``kv_producer``,
``kv_consumer`` or ``kv_both``). A producer serving a request whose ``kv_transfer_params`` say
``do_remote_decode`` returns, from ``request_finished``, ``do_remote_prefill`` parameters naming
its agent (``remote_agent``, also as ``remote_host``/``remote_port``), the namespace, and the
hashes of the blocks it saved (``remote_block_hashes``), for the proxy to pass to the decode
engine, as far as its agent holds them when the request finishes; its agent keeps them for the
decode's pull under a random ticket (``remote_hold_ticket``) that the pull passes back, so that
the pull ends exactly that request's holds. Its blocks are in the
agent's arena already, so vLLM frees its GPU blocks at once. A consumer given parameters that
carry a kvtier producer's block hashes (others' are left alone) has its own agent pull the
blocks from the producer's (one of a few
background threads; the scheduler is told "not known yet" meanwhile), then claims them, pinned,
as an asynchronous load reported through ``get_finished``. The producer's hashes travel with the
request, so the two engines need not share a hash seed. A pull that fails is a recompute.

If the agent is absent or fails, the connector reports no hit and saves nothing: vLLM computes.

Copies between the KV cache and the arena go through the copy engine of the KV tensors' device,
picked with no configuration: memcpy on a thread pool for CPU engines; for CUDA (or ROCm)
engines, batched DMA ordered on the engine's current stream, with the arena registered as pinned
memory. A save's copies overlap the following layers and are waited for before the slots are
published; a synchronous load makes the engine's stream wait for it. Where the device has no engine (no
driver, no device, a build without the backend), the scheduler promises no loads and plans no
saves, the worker leaves its KV cache alone, and vLLM recomputes; the reason is logged once.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvtier
from kvtier import devices

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier.vllm")

# Leases taken by the scheduler side, handed to the worker side of the same process (the
# in-process engine), so a load reads blocks that were pinned when they were claimed. Leases are
# released through the client that took them.
_LEASES: dict[str, tuple[kvtier.Client, list[kvtier.Leases]]] = {}
_LEASES_LOCK = threading.Lock()


@dataclass
class RequestKeys:
    """What both sides need to address one request's blocks."""

    lora: str | None
    cache_salt: str | None
    hashes: list[bytes]


@dataclass
class LoadSpec:
    """Blocks to copy from the arena into a request's blocks before the forward pass: the
    request's blocks ``first`` onwards (the ones before are vLLM's own prefix-cache hits)."""

    req_id: str
    keys: RequestKeys
    block_ids: list[int]
    first: int
    asynchronous: bool = False


@dataclass
class SaveSpec:
    """Blocks computed this step, to save after the forward pass."""

    req_id: str
    keys: RequestKeys
    block_ids: list[int]


@dataclass
class KvTierMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One scheduling step's work for the workers."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


@dataclass
class _StepSave:
    """A save of this step whose slots are reserved and filled layer by layer."""

    req_id: str
    reservation: kvtier.Reservation
    block_ids: list[int]
    failed: bool = False


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0


def _device_name(device_type: str, index: int | None) -> str:
    """kvtier's name of a torch device (this torch build says whether ``cuda`` is ROCm)."""
    import torch

    return devices.device_name(device_type, index, hip=getattr(torch.version, "hip", None) is not None)


def _engine_device(vllm_config: VllmConfig) -> str:
    """kvtier's name of the device the engine's KV cache will live on (scheduler side, before
    any tensor exists)."""
    return _device_name(str(getattr(vllm_config.device_config, "device_type", "cpu") or "cpu"), None)


def _extra(vllm_config: VllmConfig) -> dict[str, Any]:
    cfg = vllm_config.kv_transfer_config
    return dict(cfg.kv_connector_extra_config or {}) if cfg is not None else {}


def _split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` as its parts, or ``None`` when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _remote_agent(params: dict[str, Any]) -> str | None:
    """The producer's agent a hand-off's parameters name (``remote_agent``, or
    ``remote_host``/``remote_port``), or ``None``; a malformed port is a ``ValueError``."""
    peer = params.get("remote_agent") or (
        f"{params['remote_host']}:{int(params['remote_port'])}"
        if params.get("remote_host") and params.get("remote_port")
        else None
    )
    return peer if isinstance(peer, str) else None


def _hold_ticket(value: object) -> int | None:
    """A producer's ``remote_hold_ticket`` (16 lowercase hex digits, not all zero), or ``None`` where it
    sends none; anything else is a ``ValueError``."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch("[0-9a-f]{16}", value):
        raise ValueError(f"remote_hold_ticket {value!r} is not 16 lowercase hex digits")
    ticket = int(value, 16)
    if ticket == 0:
        raise ValueError("remote_hold_ticket 0 names no hold")
    return ticket


def _stored_here(tiers: list[int]) -> int:
    """How many leading blocks of a lookup this node's agent stores itself (not at a peer)."""
    return next((i for i, t in enumerate(tiers) if t == kvtier.TIER_PEER), len(tiers))


# Threads (each with its own connection to the agent) that pull and promote for the scheduler.
_BACKGROUND_THREADS = 4
# How long a producer waits before asking an agent that could not say its peer address again.
_PEER_ADDRESS_RETRY_S = 10.0


class KvTierConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """Offloads and reuses vLLM's KV cache through the kvtier node agent."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = _extra(vllm_config)
        role_name = str(getattr(vllm_config.kv_transfer_config, "kv_role", None) or "kv_both")
        self._producer = role_name in ("kv_producer", "kv_both")
        self._consumer = role_name in ("kv_consumer", "kv_both")
        self._block_size = int(vllm_config.cache_config.block_size)
        # A consumer (a decode engine) receives KV: it saves only if told to.
        self._do_save = bool(extra.get("save", role_name != "kv_consumer"))
        self._do_load = bool(extra.get("load", True))
        self._min_prefix = int(extra.get("min_prefix_tokens", self._block_size))
        self._socket: str | None = extra.get("socket")
        self._timeout_ms = int(extra.get("timeout_ms", 1000))
        self._client = kvtier.Client(
            self._socket, timeout_ms=self._timeout_ms, name=f"vllm-{role.name.lower()}", lazy=True
        )
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        self._page_bytes = int(spec.page_size_bytes)
        self._num_layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
        self._ns_fields: dict[str, Any] = {
            "model": str(model.model),
            "revision": model.revision,
            "kv_dtype": f"{vllm_config.cache_config.cache_dtype}/{model.dtype}",
            "kv_layout": f"{kv_cache_config.kv_cache_layout or 'default'}"
            f":{self._page_bytes}:{self._num_layers}",
            "block_size": self._block_size,
            "tp_world": int(parallel.tensor_parallel_size),
            "pp_stage": 0,
            "kv_group": 0,
        }
        self._tp_world = int(parallel.tensor_parallel_size)
        if int(parallel.pipeline_parallel_size) > 1:
            # Each stage holds its own layers of a block, and the scheduler sees one stage's
            # layout: blocks would be saved and found under one namespace for all stages.
            raise ValueError(
                "the kvtier connector does not support pipeline parallelism (pipeline_parallel_size > 1)"
            )
        # Steps scheduled ahead of the one whose output arrives last: vLLM keeps up to two in
        # flight with asynchronous scheduling (pipeline stages, which would add one each, are
        # refused above).
        self._steps_in_flight = 2
        self._device_ok = True
        if role == KVConnectorRole.SCHEDULER and not devices.usable(_engine_device(vllm_config)):
            self._device_ok = False
            self._do_save = self._do_load = False
        # The model the agent reports this engine's blocks under to the cluster index: the name
        # clients and routers use (vLLM's served model name), unless configured.
        served = model.served_model_name
        if isinstance(served, (list, tuple)):
            served = served[0] if served else None
        self._index_model = str(extra.get("index_model") or served or model.model)
        self._announced: set[bytes] = set()
        self._pd_params = str(extra.get("pd_params", "vllm"))
        if self._pd_params not in ("vllm", "kvtier", "off"):
            raise ValueError(f"kvtier: pd_params must be vllm, kvtier or off, not {self._pd_params!r}")
        self._peer_address: str | None = extra.get("peer_address")
        if self._peer_address is not None and _split_address(self._peer_address) is None:
            raise ValueError(f"kvtier: peer_address must be host:port, not {self._peer_address!r}")
        # When the agent last could not say its peer address: asked again only after a while,
        # so that finishing requests do not each wait on an agent that is away.
        self._peer_address_failed_at = -_PEER_ADDRESS_RETRY_S
        self._pull_timeout_ms = int(extra.get("pull_timeout_ms", 10_000))
        # Pulls from producers' agents in flight (decode side), by request, and the hashes of
        # the requests whose pull is done: their blocks are keyed by the producer's hashes.
        self._pulls: dict[str, Future[int]] = {}
        # What ends a pending pull's hand-off at the producer if the pull never starts: its
        # agent, namespaces and hold ticket.
        self._handoffs: dict[str, tuple[str, list[bytes], int]] = {}
        self._remote_hashes: dict[str, list[bytes]] = {}
        # Requests whose remote prefill is over here (pulled, failed or declined): their
        # parameters are another connector's to read too, so they are not changed.
        self._remote_over: set[str] = set()
        # Clients of the background threads (pulls may take seconds: one connection each).
        self._background_clients = threading.local()
        # Scheduler side.
        self._tracked: dict[str, _Tracked] = {}
        # Tokens vLLM had computed locally when it last asked about a request: where the
        # external hit starts (`request.num_computed_tokens` is set only after allocation).
        self._local_tokens: dict[str, int] = {}
        # Requests whose claim was for an asynchronous load.
        self._async_claims: set[str] = set()
        # Promotions from lower tiers in flight, by request. They run on a client of their own,
        # so that a slow promotion never holds the connection the scheduler asks on, and they
        # only bring blocks up: the claim pins them afterwards on the scheduler's connection.
        self._promotions: dict[str, Future[None]] = {}
        # Requests whose blocks were promoted for them: claimed as asynchronous loads, and not
        # promoted twice.
        self._promoted: set[str] = set()
        self._scheduler_pool: ThreadPoolExecutor | None = None
        # Loads decided since the last step's metadata.
        self._new_loads: list[LoadSpec] = []
        # Per step scheduled and possibly still running (several with asynchronous scheduling
        # or pipeline stages), the requests it loads synchronously: their pins are done with
        # once the step has run (workers in other processes pin their own shards within it).
        self._sync_loaded: deque[set[str]] = deque()
        # Worker side.
        self._engine: kvtier.CopyEngine | None = None
        self._layers: list[tuple[int, int, int]] = []
        self._layer_of: dict[str, int] = {}
        self._offsets: list[int] = []
        self._tp_rank = 0
        self._load_errors: set[int] = set()
        self._step_saves: list[_StepSave] | None = None
        self._saved_layers: set[int] = set()
        # Requests whose synchronous load failed this step.
        self._failed_loads: set[str] = set()
        self._worker_pool: ThreadPoolExecutor | None = None
        self._loading: dict[str, tuple[LoadSpec, Future[set[int]]]] = {}

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache, not a hand-off: a save lost to a preemption is a later miss, no more."""
        return False

    # ---- namespaces -----------------------------------------------------------------------

    def _namespace(self, keys: RequestKeys, rank: int) -> bytes:
        return kvtier.namespace(**self._ns_fields, tp_rank=rank, lora=keys.lora, cache_salt=keys.cache_salt)

    def _namespaces(self, keys: RequestKeys) -> list[bytes]:
        """The namespace of every tensor-parallel rank's shards of ``keys``' blocks."""
        return [self._namespace(keys, rank) for rank in range(self._tp_world)]

    def _announce(self, ns: bytes) -> None:
        """Tells the agent, once per namespace, the model its blocks belong to, so that the
        agent reports them to the cluster index under the name routers score by (the client
        repeats it on every new connection)."""
        if ns in self._announced:
            return
        try:
            self._client.announce(ns, self._index_model)
            self._announced.add(ns)
        except kvtier.KvtierError as e:
            logger.debug("kvtier: announce failed (the next save tries again): %s", e)

    @staticmethod
    def _keys(request: Request) -> RequestKeys:
        lora = request.lora_request.lora_name if request.lora_request is not None else None
        return RequestKeys(lora=lora, cache_salt=request.cache_salt, hashes=list(request.block_hashes))

    def _keys_for(self, request: Request) -> RequestKeys:
        """The keys to load a request's blocks by: the producer's hashes for blocks pulled from
        a prefill engine, else the request's own."""
        keys = self._keys(request)
        remote = self._remote_hashes.get(request.request_id)
        if remote is not None:
            keys.hashes = remote + keys.hashes[len(remote) :]
        return keys

    # ---- scheduler side -------------------------------------------------------------------

    @staticmethod
    def _release_all(owner: kvtier.Client, held: list[kvtier.Leases]) -> None:
        for leases in held:
            try:
                owner.release(leases)
            except kvtier.KvtierError as e:
                logger.debug("kvtier: release failed: %s", e)

    @classmethod
    def _drop_leases(cls, req_id: str) -> None:
        with _LEASES_LOCK:
            entry = _LEASES.pop(req_id, None)
        if entry is not None:
            cls._release_all(*entry)

    def _cancel_promotion(self, req_id: str) -> None:
        """Forgets a promotion (one in flight completes on its own, pinning nothing; one not
        started yet never starts)."""
        pending = self._promotions.pop(req_id, None)
        if pending is not None:
            pending.cancel()
        self._promoted.discard(req_id)

    def _background_client(self) -> kvtier.Client:
        """The calling background thread's own connection to the agent: a pull or promotion
        may take seconds, and calls on one connection run one at a time."""
        client: kvtier.Client | None = getattr(self._background_clients, "client", None)
        if client is None:
            # A promotion may pull the blocks from another node's agent first.
            client = kvtier.Client(
                self._socket,
                timeout_ms=max(self._timeout_ms, self._pull_timeout_ms),
                name="vllm-background",
                lazy=True,
            )
            self._background_clients.client = client
        return client

    def _promote(self, namespaces: list[bytes], hashes: list[bytes]) -> None:
        """Brings blocks up to host memory for every rank (the agent promotes what it pins)."""
        promoter = self._background_client()
        for ns in namespaces:
            promoter.release(promoter.acquire(ns, hashes))

    def _start_promotion(self, req_id: str, namespaces: list[bytes], hashes: list[bytes]) -> None:
        self._promotions[req_id] = self._pool().submit(self._promote, namespaces, hashes)

    # ---- prefill/decode disaggregation ----------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._scheduler_pool is None:
            # Several, so that one slow or dead peer does not hold up every other request's pull.
            self._scheduler_pool = ThreadPoolExecutor(
                max_workers=_BACKGROUND_THREADS, thread_name_prefix="kvtier-background"
            )
        return self._scheduler_pool

    def _pull(self, peer: str, namespaces: list[bytes], hashes: list[bytes], ticket: int | None) -> int:
        """Has the local agent copy the blocks from the producer's agent, for every rank;
        returns how many leading blocks every rank now holds. With the producer's hold ticket,
        each rank's pull ends that rank's holds of the hand-off at the producer."""
        puller = self._background_client()
        held = len(hashes)
        for rank, ns in enumerate(namespaces):
            try:
                flags = puller.pull(peer, ns, hashes, ticket)
            except Exception:
                # The request is computed here: the hand-off ends, in the background, this
                # rank's holds (its pull may have failed before its grant) and those of the
                # ranks not pulled yet (the earlier ranks' ended with their pulls).
                self._end_handoff(peer, namespaces[rank:], ticket)
                raise
            held = min(held, next((i for i, f in enumerate(flags) if not f), len(flags)))
        return held

    def _end_handoff(self, peer: str, namespaces: list[bytes], ticket: int | None) -> None:
        """Tells the producer's agent, in the background, that this engine pulls no more of a
        hand-off, so that it stops holding its blocks (they expire there otherwise)."""
        if ticket is not None:
            self._pool().submit(self._end_handoff_now, peer, namespaces, ticket)

    def _end_handoff_now(self, peer: str, namespaces: list[bytes], ticket: int) -> None:
        for ns in namespaces:
            try:
                # A pull of no block under the ticket only ends the hand-off's holds: every
                # rank's where both agents are of this release (the calls after the first end
                # nothing), the rank of `ns` where either is older.
                self._background_client().pull(peer, ns, [], ticket)
            except kvtier.KvtierError as e:
                logger.debug("kvtier: ending a hand-off at %s failed (its holds expire): %s", peer, e)
            except Exception:
                # Nobody waits for this thread's outcome: said here, or never.
                logger.warning(
                    "kvtier: ending a hand-off at %s failed (its holds expire)", peer, exc_info=True
                )

    def _end_declined_handoff(self, params: dict[str, Any], ours: list[bytes]) -> None:
        """Ends the hand-off of parameters this engine declines (malformed, of another KV
        layout, of a request that finished before it was asked about, or any, without a copy
        engine), as far as they name its agent and ticket well: under the producer's first
        namespace where they name another one (an agent of this release ends every rank's
        holds of the ticket whichever it is told; an older one only that rank's), else under
        this engine's namespaces."""
        try:
            peer = _remote_agent(params)
            ticket = _hold_ticket(params.get("remote_hold_ticket"))
        except (ValueError, TypeError):
            return
        if peer is None:
            return
        theirs = params.get("remote_namespace")
        if isinstance(theirs, str) and re.fullmatch("[0-9a-f]{32}", theirs) and theirs != ours[0].hex():
            self._end_handoff(peer, [bytes.fromhex(theirs)], ticket)
        else:
            self._end_handoff(peer, ours, ticket)

    def _handed_over(self, request: Request) -> dict[str, Any] | None:
        """The parameters of a request handed to this decode engine whose remote prefill is
        not over here (not pulled, failed or declined yet): those carrying a kvtier producer's
        block hashes; other connectors' (NIXL's, beside kvtier in a MultiConnector) are left to
        them and never changed."""
        params = getattr(request, "kv_transfer_params", None)
        if (
            not self._consumer
            or self._pd_params == "off"
            or not params
            or not params.get("remote_block_hashes")
            or request.request_id in self._remote_over
        ):
            return None
        return cast("dict[str, Any]", params)

    def _remote_prefill(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool] | None:
        """The decode side of a disaggregated request (see :meth:`_handed_over`): starts or
        checks the pull of the producer's blocks. ``None`` when the request is not one (or its
        pull is over): the ordinary lookup then finds what was pulled."""
        params = self._handed_over(request)
        if params is None:
            return None
        req_id = request.request_id
        pending = self._pulls.get(req_id)
        if pending is None:
            keys = self._keys(request)
            namespaces = self._namespaces(keys)
            if not self._device_ok:
                # No copy engine here: every request is computed, this one too.
                self._remote_over.add(req_id)
                self._end_declined_handoff(params, namespaces)
                return None
            try:
                peer = _remote_agent(params)
                hashes = [bytes.fromhex(h) for h in params.get("remote_block_hashes") or []]
                ticket = _hold_ticket(params.get("remote_hold_ticket"))
            except (ValueError, TypeError) as e:
                # A proxy's mistake costs this request its transfer, nothing else.
                logger.warning("kvtier: %s has malformed kv_transfer_params, computing it: %s", req_id, e)
                self._remote_over.add(req_id)
                self._end_declined_handoff(params, namespaces)
                return None
            if peer is None or not hashes:
                self._remote_over.add(req_id)
                return None
            if params.get("remote_namespace") not in (None, namespaces[0].hex()):
                logger.warning(
                    "kvtier: %s was prefilled under another KV layout (model, dtype, block size or "
                    "TP differ between the engines); computing it here",
                    req_id,
                )
                self._remote_over.add(req_id)
                self._end_declined_handoff(params, namespaces)
                return None
            loadable = min(len(hashes), (request.num_tokens - 1) // self._block_size)
            if loadable * self._block_size <= num_computed_tokens:
                # This engine's own cache covers what the producer holds.
                self._end_handoff(peer, namespaces, ticket)
                self._remote_over.add(req_id)
                return None
            self._remote_hashes[req_id] = hashes[:loadable]
            self._pulls[req_id] = self._pool().submit(self._pull, peer, namespaces, hashes[:loadable], ticket)
            if ticket is not None:
                self._handoffs[req_id] = (peer, namespaces, ticket)
            return None, False
        if not pending.done():
            return None, False
        del self._pulls[req_id]
        self._handoffs.pop(req_id, None)
        self._remote_over.add(req_id)
        error = pending.exception()
        if error is not None:
            logger.warning(
                "kvtier: pull of %s from its prefill engine failed, computing it: %s", req_id, error
            )
            self._remote_hashes.pop(req_id, None)
            return None
        logger.debug("kvtier: pulled %d blocks of %s from its prefill engine", pending.result(), req_id)
        # Claimed below through the ordinary path, under the producer's hashes, as an
        # asynchronous load (the blocks reach the GPU beside other requests' forward passes).
        self._promoted.add(req_id)
        return None

    def _agent_peer_address(self) -> str | None:
        if self._peer_address is None:
            if time.monotonic() - self._peer_address_failed_at < _PEER_ADDRESS_RETRY_S:
                return None
            try:
                address = json.loads(self._client.stats()).get("peer", {}).get("address")
            except (kvtier.KvtierError, ValueError, AttributeError) as e:
                # The agent is away: asked again in a while.
                logger.debug("kvtier: no peer address from the agent: %s", e)
                self._peer_address_failed_at = time.monotonic()
                return None
            if not isinstance(address, str) or _split_address(address) is None:
                logger.warning(
                    "kvtier: this engine produces KV for remote decoding but its agent serves no "
                    "peers (set peer.listen on the agent, or peer_address here); decode engines "
                    "will compute"
                )
                address = ""
            self._peer_address = address
        return self._peer_address or None

    def _transfer_params(self, request: Request, tracked: _Tracked | None) -> dict[str, Any] | None:
        """What a producer returns for a request a decode engine continues: the blocks its
        agent stores, from the first, as the agent answers now (a block saved and evicted since,
        or never saved, ends the prefix), which the agent then keeps for the decode's pull."""
        params = getattr(request, "kv_transfer_params", None)
        if not self._producer or self._pd_params == "off" or not params or not params.get("do_remote_decode"):
            return None
        from vllm.v1.request import RequestStatus

        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return None
        saved = tracked.saved_blocks if tracked is not None else 0
        address = self._agent_peer_address() if saved > 0 else None
        split = _split_address(address) if address is not None else None
        if address is None or split is None:
            return None
        keys = self._keys(request)
        # A decode engine loads the blocks before the prompt's last token (it computes that
        # token itself): a full last block would be handed over, and held, for nothing.
        hashes = keys.hashes[: min(saved, (request.num_prompt_tokens - 1) // self._block_size)]
        if not hashes:
            return None
        namespaces = self._namespaces(keys)
        # Names this hand-off's holds: the decode's pull ends exactly them.
        ticket = secrets.randbits(64) or 1
        try:
            if self._tp_world > 1:
                # Only the prefix every rank stores is handed over, so only it is held.
                hashes = hashes[: min(_stored_here(self._client.lookup(ns, hashes)) for ns in namespaces)]
            # Held for the decode's pull (not evicted until it ends or the agent's hold time
            # passes), and advertised as far as every rank's agent stores them.
            held = min(len(self._client.hold(ns, hashes, ticket)[0]) for ns in namespaces)
        except kvtier.KvtierError as e:
            logger.debug(
                "kvtier: hold of %s's saved blocks failed; its decode computes: %s", request.request_id, e
            )
            held = 0
        if held == 0:
            self._unhold(namespaces, ticket)
            return None
        ours: dict[str, Any] = {
            "remote_agent": address,
            "remote_namespace": namespaces[0].hex(),
            "remote_block_hashes": [h.hex() for h in hashes[:held]],
            "remote_hold_ticket": f"{ticket:016x}",
        }
        if self._pd_params == "kvtier":
            return ours
        host, port = split
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": host,
            "remote_port": port,
            **ours,
            "remote_num_tokens": held * self._block_size,
        }

    def _unhold(self, namespaces: list[bytes], ticket: int) -> None:
        """Ends a hand-off's holds on this node's agent (no decode will pull it)."""
        for ns in namespaces:
            try:
                self._client.unhold(ns, ticket)
            except kvtier.KvtierError as e:
                logger.debug("kvtier: ending a hand-off's holds failed (they expire): %s", e)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the agent holds, all pinned before they are
        claimed: ``None`` ("ask again") while blocks are being promoted from a lower tier."""
        req_id = request.request_id
        self._drop_leases(req_id)
        self._async_claims.discard(req_id)
        self._local_tokens[req_id] = num_computed_tokens
        remote = self._remote_prefill(request, num_computed_tokens)
        if remote is not None:
            return remote
        if not self._device_ok or (not self._do_load and req_id not in self._remote_hashes):
            return 0, False
        keys = self._keys_for(request)
        # A synchronous load must leave at least one token to compute.
        loadable = min(len(keys.hashes), (request.num_tokens - 1) // self._block_size)
        if loadable * self._block_size <= max(num_computed_tokens, self._min_prefix - 1):
            self._cancel_promotion(req_id)
            return 0, False
        pending = self._promotions.get(req_id)
        if pending is not None:
            if not pending.done():
                return None, False
            del self._promotions[req_id]
            if pending.exception() is not None:
                logger.debug("kvtier: promotion failed, computing instead: %s", pending.exception())
                return 0, False
            self._promoted.add(req_id)
        namespaces = self._namespaces(keys)
        for ns in namespaces:
            # The agent looks for the blocks at other nodes under the namespace's model.
            self._announce(ns)
        wanted = keys.hashes[:loadable]
        try:
            tiers = [self._client.lookup(ns, wanted) for ns in namespaces]
        except kvtier.KvtierError as e:
            logger.debug("kvtier: lookup failed, computing instead: %s", e)
            return 0, False
        matched = min(len(t) for t in tiers)
        lower = [i for ranks in tiers for i, t in enumerate(ranks[:matched]) if t != kvtier.TIER_HOST]
        if lower and req_id in self._promoted:
            # Promoted once already (and partly evicted since): claim what is in memory.
            matched = min(lower)
        elif lower:
            if matched * self._block_size > max(num_computed_tokens, self._min_prefix - 1):
                self._start_promotion(req_id, namespaces, wanted[:matched])
                return None, False
            return 0, False
        if matched * self._block_size <= num_computed_tokens or matched * self._block_size < self._min_prefix:
            return 0, False
        held: list[kvtier.Leases] = []
        try:
            for ns in namespaces:
                held.append(self._client.acquire(ns, wanted[:matched]))
        except kvtier.KvtierError as e:
            logger.debug("kvtier: acquire failed, computing instead: %s", e)
            self._release_all(self._client, held)
            return 0, False
        return self._claim(
            req_id, self._client, held, num_computed_tokens, asynchronous=req_id in self._promoted
        )

    def _claim(
        self,
        req_id: str,
        owner: kvtier.Client,
        held: list[kvtier.Leases],
        num_computed: int,
        asynchronous: bool,
    ) -> tuple[int, bool]:
        """Claims the blocks pinned for every rank, beyond what vLLM has computed."""
        matched = min(leases.prefix_len() for leases in held)
        if matched * self._block_size <= num_computed or matched * self._block_size < self._min_prefix:
            self._release_all(owner, held)
            return 0, False
        with _LEASES_LOCK:
            _LEASES[req_id] = (owner, held)
        if asynchronous:
            self._async_claims.add(req_id)
        return matched * self._block_size - num_computed, asynchronous

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Records the request and, for a hit, the blocks to load into."""
        req_id = request.request_id
        resumed = req_id in self._tracked
        tracked = self._tracked.setdefault(req_id, _Tracked(request))
        if num_external_tokens <= 0:
            # No hit, or (second call) an asynchronous load has completed: pins are done with.
            self._drop_leases(req_id)
            return
        block_ids = list(blocks.get_block_ids()[0])
        first = self._local_tokens.get(req_id, 0) // self._block_size
        count = num_external_tokens // self._block_size
        keys = self._keys_for(request)
        self._remote_hashes.pop(req_id, None)
        self._new_loads.append(
            LoadSpec(
                req_id=req_id,
                keys=RequestKeys(keys.lora, keys.cache_salt, keys.hashes[first : first + count]),
                block_ids=block_ids[first : first + count],
                first=first,
                asynchronous=req_id in self._async_claims,
            )
        )
        self._promoted.discard(req_id)
        if resumed:
            logger.debug("kvtier: %s resumes with %d blocks from kvtier", req_id, count)
        # The loaded blocks are in the agent already: nothing to save for them.
        tracked.saved_blocks = max(tracked.saved_blocks, first + count)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The loads decided since the last step, and the blocks that become full this step, to
        save. Loads are not tied to scheduled requests: an asynchronous one runs while its
        request waits, and a preempted request resumes among the cached ones."""
        meta = KvTierMetadata(loads=self._new_loads, preempted=set(scheduler_output.preempted_req_ids or ()))
        self._new_loads = []
        self._sync_loaded.append({load.req_id for load in meta.loads if not load.asynchronous})
        # A step whose output never reached update_connector_output (vLLM reports none for a
        # step with no forward pass and nothing to say) is done once this many later steps
        # were scheduled: its pins go then at the latest.
        while len(self._sync_loaded) > self._steps_in_flight + 1:
            for req_id in self._sync_loaded.popleft():
                self._drop_leases(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan_save(meta, tracked, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    tracked.block_ids = list(new_ids[0])
                else:
                    tracked.block_ids.extend(new_ids[0])
            self._plan_save(meta, tracked, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _plan_save(
        self, meta: KvTierMetadata, tracked: _Tracked, num_computed: int, scheduler_output: SchedulerOutput
    ) -> None:
        if not self._do_save:
            return
        req = tracked.request
        scheduled = scheduler_output.num_scheduled_tokens.get(req.request_id, 0)
        hashes = list(req.block_hashes)
        full = min((num_computed + scheduled) // self._block_size, len(hashes), len(tracked.block_ids))
        if full <= tracked.saved_blocks:
            return
        keys = self._keys(req)
        start = tracked.saved_blocks
        meta.saves.append(
            SaveSpec(
                req_id=req.request_id,
                keys=RequestKeys(keys.lora, keys.cache_salt, hashes[start:full]),
                block_ids=tracked.block_ids[start:full],
            )
        )
        tracked.saved_blocks = full

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """After a step: the synchronous loads it ran are done, so are their pins (the oldest
        step's: outputs come in order, and a step with none leaves its entry to the next)."""
        for req_id in self._sync_loaded.popleft() if self._sync_loaded else ():
            self._drop_leases(req_id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forgets the request; its blocks are vLLM's to free at once (vLLM itself delays the
        free of a request finished while its asynchronous load runs)."""
        req_id = request.request_id
        params = self._transfer_params(request, self._tracked.get(req_id))
        self._tracked.pop(req_id, None)
        pull = self._pulls.pop(req_id, None)
        handoff = self._handoffs.pop(req_id, None)
        if pull is not None:
            # One not started yet never starts (its hand-off is ended instead); one under way
            # lands blocks for nobody.
            if pull.cancel() and handoff is not None:
                self._end_handoff(*handoff)
        elif (handed := self._handed_over(request)) is not None:
            # Finished (aborted) before the scheduler asked about it: nothing will pull it.
            self._end_declined_handoff(handed, self._namespaces(self._keys(request)))
        self._remote_over.discard(req_id)
        self._remote_hashes.pop(req_id, None)
        self._local_tokens.pop(req_id, None)
        self._async_claims.discard(req_id)
        self._cancel_promotion(req_id)
        for step in self._sync_loaded:
            step.discard(req_id)
        self._drop_leases(req_id)
        return False, params

    # ---- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Learns where every layer keeps its block pages (layers sharing one tensor are one
        layer of the saved block)."""
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._tp_rank = int(get_tensor_model_parallel_rank())
        except (AssertionError, ImportError):
            self._tp_rank = 0
        index_of_base: dict[int, int] = {}
        layers: list[tuple[int, int, int]] = []
        first = next(iter(kv_caches.values()), None)
        if first is not None:
            self._engine = devices.open_engine(_device_name(first.device.type, first.device.index))
        for name, t in kv_caches.items():
            base = int(t.data_ptr())
            if base in index_of_base:
                self._layer_of[name] = index_of_base[base]
                continue
            page = int(t[0].numel() * t.element_size())
            stride = int(t.stride(0) * t.element_size())
            dense = devices.page_is_dense(t[0].shape, t[0].stride())
            if not dense or page != self._page_bytes:
                raise ValueError(
                    f"kvtier: layer {name} has pages of {page} bytes (gap-free: {dense}), "
                    f"expected gap-free pages of {self._page_bytes}"
                )
            index_of_base[base] = self._layer_of[name] = len(layers)
            layers.append((base, stride, page))
        if self._engine is not None and self._engine.asynchronous:
            # Pin the arena for DMA now rather than in the first forward pass; if the agent is
            # not up yet, the first copy does it.
            try:
                self._client.register_arena(self._engine)
            except kvtier.KvtierError as e:
                logger.info("kvtier: arena not registered yet (%s); the first copy will", e)
        # Without a copy engine the worker copies nothing: no layers, so loads fail (vLLM
        # recomputes) and saves reserve nothing.
        self._layers = layers if self._engine is not None else []
        self._offsets = [sum(page for _, _, page in layers[:i]) for i in range(len(layers))]

    def _stream(self) -> int:
        """The engine's current stream, which device copies are ordered against (0 for CPU)."""
        if self._engine is None or not self._engine.asynchronous:
            return 0
        import torch

        return int(torch.cuda.current_stream().cuda_stream)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Starts a step: no slots reserved and no layer saved yet."""
        super().bind_connector_metadata(connector_metadata)
        self._step_saves = None
        self._saved_layers = set()
        self._failed_loads = set()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Preempted requests' blocks may be reused from this step on. Saves finish within the
        step that planned them, so none reads such a block any more; an asynchronous load still
        writing into one (its request was never running, so this is defensive) is waited for."""
        if not isinstance(kv_connector_metadata, KvTierMetadata):
            return
        for req_id in kv_connector_metadata.preempted:
            entry = self._loading.get(req_id)
            if entry is not None:
                entry[1].exception()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Copies this step's synchronous hits into their blocks; starts the asynchronous ones."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierMetadata):
            return
        # Device copies are ordered after the work queued so far on this thread's stream (which
        # includes vLLM zeroing newly allocated blocks), also those of asynchronous loads.
        stream = self._stream()
        for load in meta.loads:
            if load.asynchronous:
                if self._worker_pool is None:
                    self._worker_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
                self._loading[load.req_id] = (load, self._worker_pool.submit(self._load, load, stream))
            else:
                failed = self._load(load, stream)
                if failed:
                    self._failed_loads.add(load.req_id)
                self._load_errors |= failed

    def _load(self, load: LoadSpec, stream: int) -> set[int]:
        """Copies a hit into its blocks (device copies ordered after the work on ``stream``);
        returns the blocks that could not be loaded."""
        with _LEASES_LOCK:
            entry = _LEASES.get(load.req_id)
        held = entry[1] if entry is not None else None
        scheduled = held[self._tp_rank] if held is not None and self._tp_rank < len(held) else None
        try:
            if not self._layers:
                raise kvtier.KvtierError("no copy engine for this worker's KV cache")
            # A synchronous load makes the forward's stream wait for its copies. An asynchronous
            # one must not hold up the steps that run meanwhile: it is waited for here, on its
            # own thread, before `get_finished` lets its request run. Either way a failed copy
            # raises here and its blocks are recomputed.
            waits = not load.asynchronous
            if scheduled is None:
                tiers = self._load_own(load, stream, waits)
            else:
                # Scheduler-pinned leases cover the request's blocks from its first one.
                tiers = scheduled.load_pages(
                    load.block_ids, self._layers, load.first, self._engine, stream, waits
                )
                scheduled.wait()
                if kvtier.TIER_MISS in tiers:
                    # The scheduler's pins ended with its connection (a call on it failed while
                    # this load waited): the blocks are likely still there, pinned again here.
                    tiers = self._load_own(load, stream, waits)
                    logger.info(
                        "kvtier: %s loaded on this worker's own pins after the scheduler's ended",
                        load.req_id,
                    )
        except Exception as e:  # any failure is a load error that vLLM handles
            logger.warning("kvtier: load of %s failed, its blocks will be recomputed: %s", load.req_id, e)
            tiers = [kvtier.TIER_MISS] * len(load.block_ids)
        finally:
            if scheduled is not None and self._tp_world == 1:
                # Loaded (or failed): the pins the scheduler took for this request are done with.
                self._drop_leases(load.req_id)
        failed = {b for b, t in zip(load.block_ids, tiers, strict=True) if t == kvtier.TIER_MISS}
        if failed:
            logger.warning("kvtier: %d blocks of %s could not be loaded", len(failed), load.req_id)
        else:
            how = "asynchronously" if load.asynchronous else "before the forward"
            logger.debug("kvtier: loaded %d blocks of %s %s", len(load.block_ids), load.req_id, how)
        return failed

    def _load_own(self, load: LoadSpec, stream: int, waits: bool) -> list[int]:
        """``load`` through pins of this worker's own connection; the tier of each block."""
        ns = self._namespace(load.keys, self._tp_rank)
        leases = self._client.acquire(ns, load.keys.hashes)
        try:
            tiers: list[int] = leases.load_pages(load.block_ids, self._layers, 0, self._engine, stream, waits)
            leases.wait()
        finally:
            self._release_all(self._client, [leases])
        return tiers

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load is complete (or failed: its blocks are then in
        ``get_block_ids_with_load_errors`` of the same step)."""
        done = {req_id for req_id, (_, pending) in self._loading.items() if pending.done()}
        for req_id in done:
            load, pending = self._loading.pop(req_id)
            error = pending.exception()
            if error is not None:
                logger.warning("kvtier: load of %s failed, its blocks will be recomputed: %s", req_id, error)
                self._load_errors |= set(load.block_ids)
            else:
                self._load_errors |= pending.result()
        return None, (done or None)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Synchronous loads complete in ``start_load_kv``; asynchronous ones belong to requests
        that are not in the forward pass."""

    def _reserve_step(self) -> list[_StepSave]:
        """Reserves arena slots for this step's saves (once per step)."""
        if self._step_saves is not None:
            return self._step_saves
        self._step_saves = []
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierMetadata) or not self._layers:
            return self._step_saves
        block_bytes = sum(page for _, _, page in self._layers)
        for save in meta.saves:
            if save.req_id in self._failed_loads:
                # Its blocks of this step were computed on top of blocks that failed to load:
                # they are wrong, and must not reach the cache.
                continue
            ns = self._namespace(save.keys, self._tp_rank)
            self._announce(ns)
            try:
                reservation = self._client.reserve_pages(ns, save.keys.hashes, block_bytes)
            except kvtier.KvtierError as e:
                logger.debug("kvtier: save skipped: %s", e)
                continue
            if reservation.reserved():
                self._step_saves.append(_StepSave(save.req_id, reservation, save.block_ids))
            else:
                self._settle(_StepSave(save.req_id, reservation, save.block_ids, failed=True))
        return self._step_saves

    def _write(self, saves: list[_StepSave], layers: list[int]) -> None:
        """Copies the pages of `layers` (consecutive layer indices) into the slots of every
        save of the step, in one batch: one copy call per layer, however many requests save."""
        live = [save for save in saves if not save.failed]
        if not live or not layers:
            return
        try:
            kvtier.write_pages_many(
                [save.reservation for save in live],
                [save.block_ids for save in live],
                [self._layers[i] for i in layers],
                offset=self._offsets[layers[0]],
                engine=self._engine,
                stream=self._stream(),
            )
        except kvtier.KvtierError as e:
            logger.debug("kvtier: save failed: %s", e)
            for save in live:
                save.failed = True

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Copies this layer's pages of the step's full blocks while they are fresh."""
        index = self._layer_of.get(layer_name)
        if index is None or index in self._saved_layers:
            return
        self._saved_layers.add(index)
        self._write(self._reserve_step(), [index])

    def _settle(self, save: _StepSave) -> None:
        try:
            if save.failed:
                self._client.abort(save.reservation)
            else:
                self._client.commit(save.reservation)
        except kvtier.KvtierError as e:
            logger.debug("kvtier: save not published: %s", e)

    def wait_for_save(self) -> None:
        """Copies the layers no attention call saved (all of them when vLLM does not save layer
        by layer), then publishes the step's blocks."""
        missing = [i for i in range(len(self._layers)) if i not in self._saved_layers]
        runs: list[list[int]] = []
        for i in missing:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        saves = self._reserve_step()
        blocks = sum(save.reservation.reserved() for save in saves)
        for run in runs:
            self._write(saves, run)
        for save in saves:
            self._settle(save)
        if saves:
            logger.debug(
                "kvtier: published %d blocks; %d of %d layers copied during the forward",
                blocks,
                len(self._layers) - len(missing),
                len(self._layers),
            )
        self._step_saves = []
        self._saved_layers = set(range(len(self._layers)))

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed: vLLM recomputes them (or fails the request under
        ``kv_load_failure_policy="fail"``, which claiming only pinned blocks avoids)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Waits for loads in flight and stops the background threads."""
        for pool in (self._worker_pool, self._scheduler_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._promotions.clear()

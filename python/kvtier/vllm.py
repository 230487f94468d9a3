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
beyond vLLM's own prefix cache; those blocks are pinned in the agent's arena at once, so that what
the connector claims stays readable even if the agent dies before the load, and copied into the
request's blocks before the forward pass. Copies run in Rust (``kvtier._native``), off the GIL.

``kv_connector_extra_config`` keys (all optional):

- ``socket``: the agent's socket (default ``$KVTIER_SOCKET``, else ``/run/kvtier/agent.sock``);
- ``timeout_ms``: bound of each call to the agent (default 1000);
- ``save``: save computed blocks (default true);
- ``load``: load hits (default true);
- ``min_prefix_tokens``: ignore hits shorter than this (default one block).

If the agent is absent or fails, the connector reports no hit and saves nothing: vLLM computes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvtier

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
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


@dataclass
class SaveSpec:
    """Blocks computed this step, to save after the forward pass."""

    keys: RequestKeys
    block_ids: list[int]


@dataclass
class KvTierMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One scheduling step's work for the workers."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0
    load: LoadSpec | None = None


def _extra(vllm_config: VllmConfig) -> dict[str, Any]:
    cfg = vllm_config.kv_transfer_config
    return dict(cfg.kv_connector_extra_config or {}) if cfg is not None else {}


class KvTierConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """Offloads and reuses vLLM's KV cache through the kvtier node agent."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = _extra(vllm_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._do_save = bool(extra.get("save", True))
        self._do_load = bool(extra.get("load", True))
        self._min_prefix = int(extra.get("min_prefix_tokens", self._block_size))
        self._client = kvtier.Client(
            extra.get("socket"),
            timeout_ms=int(extra.get("timeout_ms", 1000)),
            name=f"vllm-{role.name.lower()}",
            lazy=True,
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
        # Scheduler side.
        self._tracked: dict[str, _Tracked] = {}
        # Tokens vLLM had computed locally when it last asked about a request: where the
        # external hit starts (`request.num_computed_tokens` is set only after allocation).
        self._local_tokens: dict[str, int] = {}
        # Worker side.
        self._layers: list[tuple[int, int, int]] = []
        self._tp_rank = 0
        self._load_errors: set[int] = set()

    # ---- namespaces -----------------------------------------------------------------------

    def _namespace(self, keys: RequestKeys, rank: int) -> bytes:
        return kvtier.namespace(**self._ns_fields, tp_rank=rank, lora=keys.lora, cache_salt=keys.cache_salt)

    @staticmethod
    def _keys(request: Request) -> RequestKeys:
        lora = request.lora_request.lora_name if request.lora_request is not None else None
        return RequestKeys(lora=lora, cache_salt=request.cache_salt, hashes=list(request.block_hashes))

    # ---- scheduler side -------------------------------------------------------------------

    @staticmethod
    def _drop_leases(req_id: str) -> None:
        with _LEASES_LOCK:
            entry = _LEASES.pop(req_id, None)
        if entry is None:
            return
        owner, held = entry
        for leases in held:
            try:
                owner.release(leases)
            except kvtier.KvtierError as e:
                logger.debug("kvtier: releasing leases of %s: %s", req_id, e)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the agent holds, all pinned now."""
        self._drop_leases(request.request_id)
        self._local_tokens[request.request_id] = num_computed_tokens
        if not self._do_load:
            return 0, False
        keys = self._keys(request)
        # A synchronous load must leave at least one token to compute.
        loadable = min(len(keys.hashes), (request.num_tokens - 1) // self._block_size)
        if loadable * self._block_size <= max(num_computed_tokens, self._min_prefix - 1):
            return 0, False
        try:
            held = [
                self._client.acquire(self._namespace(keys, rank), keys.hashes[:loadable])
                for rank in range(self._tp_world)
            ]
        except kvtier.KvtierError as e:
            logger.debug("kvtier: lookup failed, computing instead: %s", e)
            return 0, False
        matched = min(leases.prefix_len() for leases in held)
        if matched * self._block_size <= num_computed_tokens or matched * self._block_size < self._min_prefix:
            for leases in held:
                self._safe_release(leases)
            return 0, False
        with _LEASES_LOCK:
            _LEASES[request.request_id] = (self._client, held)
        return matched * self._block_size - num_computed_tokens, False

    def _safe_release(self, leases: kvtier.Leases) -> None:
        try:
            self._client.release(leases)
        except kvtier.KvtierError as e:
            logger.debug("kvtier: release failed: %s", e)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Records the request and, for a hit, the blocks to load into."""
        tracked = self._tracked.setdefault(request.request_id, _Tracked(request))
        if num_external_tokens <= 0:
            if num_external_tokens == 0 and tracked.load is None:
                self._drop_leases(request.request_id)
            return
        block_ids = list(blocks.get_block_ids()[0])
        first = self._local_tokens.get(request.request_id, 0) // self._block_size
        count = num_external_tokens // self._block_size
        keys = self._keys(request)
        tracked.load = LoadSpec(
            req_id=request.request_id,
            keys=RequestKeys(keys.lora, keys.cache_salt, keys.hashes[first : first + count]),
            block_ids=block_ids[first : first + count],
            first=first,
        )
        # The loaded blocks are in the agent already: nothing to save for them.
        tracked.saved_blocks = first + count

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The step's loads, and the blocks that become full this step, to save."""
        meta = KvTierMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            if tracked.load is not None:
                meta.loads.append(tracked.load)
                tracked.load = None
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
                keys=RequestKeys(keys.lora, keys.cache_salt, hashes[start:full]),
                block_ids=tracked.block_ids[start:full],
            )
        )
        tracked.saved_blocks = full

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forgets the request; its blocks are vLLM's to free at once."""
        self._tracked.pop(request.request_id, None)
        self._local_tokens.pop(request.request_id, None)
        self._drop_leases(request.request_id)
        return False, None

    # ---- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Learns where every layer keeps its block pages (deduplicating shared layers)."""
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._tp_rank = int(get_tensor_model_parallel_rank())
        except (AssertionError, ImportError):
            self._tp_rank = 0
        seen: set[int] = set()
        layers = []
        for name, t in kv_caches.items():
            base = int(t.data_ptr())
            if base in seen:
                continue
            seen.add(base)
            page = int(t[0].numel() * t.element_size())
            stride = int(t.stride(0) * t.element_size())
            if not t[0].is_contiguous() or page != self._page_bytes:
                raise ValueError(
                    f"kvtier: layer {name} has pages of {page} bytes (contiguous: {t[0].is_contiguous()}), "
                    f"expected contiguous pages of {self._page_bytes}"
                )
            layers.append((base, stride, page))
        self._layers = layers

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Copies every hit of this step into its blocks before the forward pass."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierMetadata):
            return
        for load in meta.loads:
            self._load(load)

    def _load(self, load: LoadSpec) -> None:
        with _LEASES_LOCK:
            entry = _LEASES.get(load.req_id)
        held = entry[1] if entry is not None else None
        leases = held[self._tp_rank] if held is not None and self._tp_rank < len(held) else None
        own = leases is None
        try:
            if leases is None:
                ns = self._namespace(load.keys, self._tp_rank)
                leases = self._client.acquire(ns, load.keys.hashes)
                tiers = leases.load_pages(load.block_ids, self._layers)
            else:
                # The scheduler pinned the request's blocks from its first one.
                tiers = leases.load_pages(load.block_ids, self._layers, load.first)
        except kvtier.KvtierError as e:
            logger.warning("kvtier: load of %s failed, its blocks will be recomputed: %s", load.req_id, e)
            tiers = [kvtier.TIER_MISS] * len(load.block_ids)
        finally:
            if own and leases is not None:
                self._safe_release(leases)
            elif self._tp_world == 1:
                # Loaded (or failed): the pins the scheduler took for this request are done with.
                self._drop_leases(load.req_id)
        failed = {b for b, t in zip(load.block_ids, tiers, strict=True) if t == kvtier.TIER_MISS}
        if failed:
            logger.warning("kvtier: %d blocks of %s could not be loaded", len(failed), load.req_id)
            self._load_errors |= failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are whole-request and finish in ``start_load_kv``."""

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """Saves happen for all layers at once in ``wait_for_save``."""

    def wait_for_save(self) -> None:
        """Saves the blocks that became full this step (their KV was written by the forward)."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierMetadata):
            return
        for save in meta.saves:
            ns = self._namespace(save.keys, self._tp_rank)
            try:
                self._client.save_pages(ns, save.keys.hashes, save.block_ids, self._layers)
            except kvtier.KvtierError as e:
                logger.debug("kvtier: save skipped: %s", e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose load failed this step: vLLM recomputes them (or fails the request under
        ``kv_load_failure_policy="fail"``, which the pinned claims avoid)."""
        errors, self._load_errors = self._load_errors, set()
        return errors

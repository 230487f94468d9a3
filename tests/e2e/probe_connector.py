"""A KV connector that moves nothing and answers a finished prefill with the keys NIXL's
connector returns, so that a test can run kvtier beside it in vLLM's MultiConnector (which refuses
two children returning the same key) without NIXL's libraries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata

if TYPE_CHECKING:
    import torch
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# What NIXL's producer returns (its shared keys), with values that name nothing.
NIXL_LIKE = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_engine_id": "probe",
    "remote_request_id": "probe",
    "remote_block_ids": [],
    "remote_host": "127.0.0.1",
    "remote_port": 1,
    "remote_num_tokens": 0,
}


class ProbeConnector(KVConnectorBase_V1):  # type: ignore[misc]
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KVConnectorMetadata()

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = getattr(request, "kv_transfer_params", None) or {}
        return False, (dict(NIXL_LIKE) if params.get("do_remote_decode") else None)

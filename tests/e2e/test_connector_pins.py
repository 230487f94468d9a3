"""The connector's two halves in one process, driven step by step as vLLM's scheduler and an
in-process worker drive them, against a real agent: how long the pins of a synchronous load
last, what a worker does when the scheduler's pins ended before its load, and which blocks a
producer has its agent hold for a decode's pull (no engine runs: the steps and their outputs
are built here, so that each case happens exactly)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request, RequestStatus

import kvtier
from kvagent_process import Agent
from kvtier import vllm as connector_module
from kvtier.vllm import KvTierConnector, RequestKeys

BLOCK = 16
LAYERS = 2
KV_HEADS = 2
HEAD_SIZE = 8
NUM_BLOCKS = 16
PROMPT_BLOCKS = 4


@pytest.fixture(scope="module")
def config(model: Path) -> VllmConfig:
    return VllmConfig(
        model_config=ModelConfig(model=str(model), dtype="float32", max_model_len=512),
        cache_config=CacheConfig(block_size=BLOCK),
        device_config=DeviceConfig("cpu"),
    )


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.float32
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)]
    )


class Engine:
    """A scheduler-side and a worker-side connector of one engine process."""

    made: ClassVar[list[Engine]] = []

    def __init__(self, config: VllmConfig, agent: Agent) -> None:
        config.kv_transfer_config = KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"socket": str(agent.socket)},
        )
        kv = kv_cache_config()
        self.scheduler = KvTierConnector(config, KVConnectorRole.SCHEDULER, kv)
        self.worker = KvTierConnector(config, KVConnectorRole.WORKER, kv)
        page = kv.kv_cache_groups[0].kv_cache_spec.page_size_bytes // 4
        self.caches = {
            name: torch.zeros(NUM_BLOCKS, page, dtype=torch.float32)
            for name in kv.kv_cache_groups[0].layer_names
        }
        self.worker.register_kv_caches(self.caches)
        self.page_bytes = page * 4
        Engine.made.append(self)

    def step(self, worker: bool = True, output: bool = True) -> None:
        """Schedules one step that computes nothing new; if ``worker``, the in-process worker
        runs its loads (in an engine with workers in other processes this one has none: they
        pin their own shards); if ``output``, the step's output reaches the scheduler."""
        meta = self.scheduler.build_connector_meta(empty_step())
        if worker:
            self.worker.bind_connector_metadata(meta)
            self.worker.start_load_kv(None)
            self.worker.clear_connector_metadata()
        if output:
            self.scheduler.update_connector_output(KVConnectorOutput())

    def shutdown(self) -> None:
        """What vLLM calls when the engine stops."""
        try:
            self.scheduler.shutdown()
        finally:
            self.worker.shutdown()

    def block_bytes(self, block_id: int) -> bytes:
        """A block's pages in the order the connector saves them: layer by layer."""
        return b"".join(t[block_id].numpy().tobytes() for t in self.caches.values())


def empty_step() -> SchedulerOutput:
    out: SchedulerOutput = SchedulerOutput.make_empty()
    return out


def shut_down_engines() -> None:
    """Shuts down every engine made so far, as vLLM does when it stops (before its agent
    does): that stops every background thread of their connectors. Each is shut down even if
    another fails; the first failure is raised after."""
    failures: list[Exception] = []
    while Engine.made:
        try:
            Engine.made.pop().shutdown()
        except Exception as e:  # re-raised below, once the others are down
            failures.append(e)
    if failures:
        raise failures[0]


@pytest.fixture
def agent(agent: Agent) -> Iterator[Agent]:
    """The suite's agent, whose engines are shut down before it stops."""
    yield agent
    shut_down_engines()


@pytest.fixture(autouse=True)
def no_connector_thread_left() -> Iterator[None]:
    """Checks that shutting the test's engines down stopped every connector thread."""
    yield
    shut_down_engines()
    left = [t.name for t in threading.enumerate() if t.name.startswith("kvtier-")]
    assert not left, f"connector threads still running after shutdown: {left}"


@pytest.fixture
def engine(config: VllmConfig, agent: Agent) -> Iterator[Engine]:
    e = Engine(config, agent)
    try:
        yield e
    finally:
        try:
            shut_down_engines()
        finally:
            connector_module._LEASES.clear()


def request(req_id: str, seed: int) -> Request:
    init_none_hash(sha256)
    ids = [(seed * 131 + i * 7) % 900 + 2 for i in range(PROMPT_BLOCKS * BLOCK + 5)]
    return Request(
        request_id=req_id,
        prompt_token_ids=ids,
        sampling_params=SamplingParams(max_tokens=4),
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK, sha256),
    )


def store_prefix(engine: Engine, agent: Agent, req: Request) -> list[bytes]:
    """Saves the request's prompt blocks in the agent, as a worker would have (random pages);
    returns each block's bytes."""
    ns = engine.scheduler._namespace(RequestKeys(None, None, []), 0)
    hashes = list(req.block_hashes)[:PROMPT_BLOCKS]
    data = [os.urandom(engine.page_bytes * LAYERS) for _ in hashes]
    assert kvtier.Client(str(agent.socket)).save(ns, hashes, data) == ["stored"] * len(hashes)
    return data


def claim(engine: Engine, req: Request, block_ids: list[int]) -> None:
    """What the scheduler does with a waiting request: asks, allocates, records."""
    tokens, asynchronous = engine.scheduler.get_num_new_matched_tokens(req, 0)
    assert (tokens, asynchronous) == (PROMPT_BLOCKS * BLOCK, False)
    blocks = KVCacheBlocks(blocks=([KVCacheBlock(block_id=b) for b in block_ids],))
    engine.scheduler.update_state_after_alloc(req, blocks, tokens)


def pinned(req_id: str) -> bool:
    """Whether the scheduler still holds the pins it took for the request's claim (the table it
    hands to an in-process worker and releases them from)."""
    return req_id in connector_module._LEASES


def test_the_in_process_worker_loads_a_synchronous_hit_and_ends_its_pins(
    engine: Engine, agent: Agent
) -> None:
    req = request("sync-in-process", 1)
    data = store_prefix(engine, agent, req)
    claim(engine, req, [3, 5, 6, 9])
    assert pinned(req.request_id)
    engine.step(output=False)
    assert [engine.block_bytes(b) for b in (3, 5, 6, 9)] == data
    assert not pinned(req.request_id), "loaded: the scheduler's pins are done with"


def test_a_synchronous_loads_pins_end_with_its_steps_output(engine: Engine, agent: Agent) -> None:
    req = request("sync-output", 2)
    store_prefix(engine, agent, req)
    claim(engine, req, [1, 2, 4, 7])
    engine.step(worker=False, output=False)
    assert pinned(req.request_id), "the step may still be running on the workers"
    engine.scheduler.update_connector_output(KVConnectorOutput())
    assert not pinned(req.request_id), "the step's output arrived: its loads are done"


def test_pins_of_a_step_whose_output_never_comes_end_after_the_steps_in_flight(
    engine: Engine, agent: Agent
) -> None:
    req = request("sync-no-output", 3)
    store_prefix(engine, agent, req)
    claim(engine, req, [1, 2, 4, 7])
    engine.step(worker=False, output=False)
    # vLLM reports no output for a step with nothing to say: the pins stay while as many steps
    # as may be in flight are scheduled after it, and go with the next.
    for _ in range(engine.scheduler._steps_in_flight):
        engine.step(worker=False, output=False)
        assert pinned(req.request_id)
    engine.step(worker=False, output=False)
    assert not pinned(req.request_id)


def test_a_worker_whose_claim_lost_the_schedulers_pins_pins_the_blocks_itself(
    engine: Engine, agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    req = request("repin", 4)
    data = store_prefix(engine, agent, req)
    claim(engine, req, [0, 8, 10, 11])
    # The scheduler's connection ends (a call on it timed out): the agent drops its pins.
    engine.scheduler._client.disconnect()
    with caplog.at_level(logging.INFO, logger="kvtier.vllm"):
        engine.step()
    assert [engine.block_bytes(b) for b in (0, 8, 10, 11)] == data
    assert "own pins" in caplog.text
    assert engine.worker.get_block_ids_with_load_errors() == set()


def held_blocks(client: kvtier.Client, until: Callable[[int], bool], timeout: float = 10) -> int:
    """The agent's held blocks once ``until`` holds for them (an ended hand-off reaches the
    producer's agent after the call that ends it returns), or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        held = int(json.loads(client.stats())["peer"]["held_blocks"])
        if until(held) or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


@pytest.fixture
def serving(workdir: Path) -> Iterator[Agent]:
    """An agent that serves peers: a prefill engine's, which decode engines pull from (here the
    decode engines use it too, and pull from it what it has already)."""
    secret = workdir / "hold-secret"
    secret.write_text("hold-test")
    agent = Agent(
        workdir / "serving.sock",
        ["--host-size", "256MiB", "--peer-listen", "127.0.0.1:0", "--peer-secret-file", str(secret)],
    )
    try:
        yield agent
    finally:
        try:
            shut_down_engines()
        finally:
            agent.kill()
            connector_module._LEASES.clear()


def two_ranks(config: VllmConfig, agent: Agent) -> Engine:
    """An engine of two tensor-parallel ranks (its workers, elsewhere, would save a shard each)."""
    engine = Engine(config, agent)
    engine.scheduler._tp_world = engine.scheduler._ns_fields["tp_world"] = 2
    return engine


def hand_off(
    engine: Engine, agent: Agent, req_id: str, seed: int, rank1_blocks: int = PROMPT_BLOCKS
) -> dict[str, Any]:
    """Finishes a prefill on a producer of two ranks whose workers saved the prompt's blocks
    (rank 1 only its first ``rank1_blocks``): the parameters it returns for the decode."""
    req = request(req_id, seed)
    hashes = list(req.block_hashes)[:PROMPT_BLOCKS]
    client = kvtier.Client(str(agent.socket))
    for rank, stored in ((0, PROMPT_BLOCKS), (1, rank1_blocks)):
        ns = engine.scheduler._namespace(RequestKeys(None, None, []), rank)
        data = [os.urandom(engine.page_bytes * LAYERS) for _ in range(stored)]
        assert client.save(ns, hashes[:stored], data) == ["stored"] * stored
    req.kv_transfer_params = {"do_remote_decode": True}
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    engine.scheduler._tracked[req.request_id] = connector_module._Tracked(req, saved_blocks=PROMPT_BLOCKS)
    _, params = engine.scheduler.request_finished(req, [])
    assert params is not None
    return params


def handed(req_id: str, seed: int, params: dict[str, Any]) -> Request:
    """The request a proxy sends on to a decode engine, with the producer's parameters."""
    req = request(req_id, seed)
    req.kv_transfer_params = params
    return req


def test_a_producer_with_two_ranks_holds_only_the_prefix_both_store(
    config: VllmConfig, serving: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill engine of two tensor-parallel ranks hands over the blocks both ranks' shards
    are stored for, and its agent holds those for the decode's pull, on each rank: none past
    them, which nobody would pull. A decode engine whose own cache covers them pulls nothing,
    and ends the hand-off's holds on both ranks."""
    engine = two_ranks(config, serving)
    req = request("handed-over", 5)
    params = hand_off(engine, serving, req.request_id, 5, rank1_blocks=PROMPT_BLOCKS - 1)
    assert params["remote_block_hashes"] == [h.hex() for h in list(req.block_hashes)[: PROMPT_BLOCKS - 1]]
    client = kvtier.Client(str(serving.socket))
    held = json.loads(client.stats())["peer"]["held_blocks"]
    assert held == 2 * (PROMPT_BLOCKS - 1), "each rank's handed-over blocks, and no others"
    ticket = params["remote_hold_ticket"]
    assert len(ticket) == 16 and int(ticket, 16) != 0

    # The decode side (this engine, as kv_both) has computed the prompt's blocks already.
    ends: list[tuple[Any, ...]] = []
    end_handoff = engine.scheduler._end_handoff
    monkeypatch.setattr(engine.scheduler, "_end_handoff", lambda *a: ends.append(a) or end_handoff(*a))
    decode = handed("decoded-here", 5, params)
    engine.scheduler.get_num_new_matched_tokens(decode, PROMPT_BLOCKS * BLOCK)
    assert held_blocks(client, lambda n: n == 0) == 0, "the hand-off ended on both ranks"
    engine.scheduler.request_finished(decode, [])
    assert len(ends) == 1, "ended once: not again when the request finishes"


@pytest.mark.parametrize(
    "reason", ["another layout", "no copy engine", "malformed hashes", "malformed namespace"]
)
def test_a_decode_that_declines_a_hand_off_ends_it(config: VllmConfig, serving: Agent, reason: str) -> None:
    """A decode engine that computes a handed-over request itself, pulling nothing, ends the
    hand-off's holds of both the producer's ranks: one whose KV layout differs from the
    producer's (one rank against two, so it knows only the producer's first namespace), one
    without a copy engine, and one given parameters it cannot read (as far as they still name
    the agent and ticket)."""
    params = hand_off(two_ranks(config, serving), serving, f"declined-{reason}", 6)
    client = kvtier.Client(str(serving.socket))
    assert json.loads(client.stats())["peer"]["held_blocks"] == 2 * PROMPT_BLOCKS
    decode = Engine(config, serving) if reason == "another layout" else two_ranks(config, serving)
    if reason == "no copy engine":
        decode.scheduler._device_ok = False
    if reason == "malformed hashes":
        params = {**params, "remote_block_hashes": ["not hex"]}
    if reason == "malformed namespace":
        params = {**params, "remote_namespace": "not hex"}
    req = handed(f"declined-{reason}-decode", 6, params)
    tokens, asynchronous = decode.scheduler.get_num_new_matched_tokens(req, 0)
    assert req.request_id not in decode.scheduler._pulls, "nothing pulled"
    assert tokens is not None and not asynchronous
    assert held_blocks(client, lambda n: n == 0) == 0
    decode.scheduler.request_finished(req, [])


def test_a_request_aborted_before_its_decode_asked_ends_the_hand_off(
    config: VllmConfig, serving: Agent
) -> None:
    """A decode engine's request that finishes (a client gone) before its scheduler ever asks
    about it has nothing pulled: the hand-off ends at once."""
    params = hand_off(two_ranks(config, serving), serving, "aborted-early", 7)
    client = kvtier.Client(str(serving.socket))
    assert json.loads(client.stats())["peer"]["held_blocks"] == 2 * PROMPT_BLOCKS
    decode = two_ranks(config, serving)
    req = handed("aborted-early-decode", 7, params)
    req.status = RequestStatus.FINISHED_ABORTED
    assert decode.scheduler.request_finished(req, []) == (False, None)
    assert held_blocks(client, lambda n: n == 0) == 0


def test_a_request_aborted_while_its_pull_waits_ends_the_hand_off(config: VllmConfig, serving: Agent) -> None:
    """A decode engine's request that finishes while its pull waits for a background thread
    (all busy with other pulls) never pulls: the hand-off ends instead."""
    params = hand_off(two_ranks(config, serving), serving, "aborted-queued", 8)
    client = kvtier.Client(str(serving.socket))
    decode = two_ranks(config, serving)
    gate = threading.Event()
    pool = decode.scheduler._pool()
    busy = [pool.submit(gate.wait, 30) for _ in range(connector_module._BACKGROUND_THREADS)]
    req = handed("aborted-queued-decode", 8, params)
    try:
        assert decode.scheduler.get_num_new_matched_tokens(req, 0) == (None, False)
        req.status = RequestStatus.FINISHED_ABORTED
        decode.scheduler.request_finished(req, [])
    finally:
        gate.set()
    assert all(b.result(timeout=10) for b in busy)
    assert held_blocks(client, lambda n: n == 0) == 0


def test_a_decode_whose_pull_fails_ends_every_ranks_holds(
    config: VllmConfig, serving: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode engine whose pull of its first rank fails computes the request: it ends the
    hand-off, and so the holds of the rank it never pulled too."""
    params = hand_off(two_ranks(config, serving), serving, "failed-pull", 9)
    client = kvtier.Client(str(serving.socket))
    decode = two_ranks(config, serving)
    rank0 = decode.scheduler._namespace(RequestKeys(None, None, []), 0)
    background = decode.scheduler._background_client

    class AwayForRank0:
        """The background client, whose pulls of rank 0's blocks fail (its transfer broke)."""

        def __init__(self, inner: kvtier.Client) -> None:
            self.inner = inner

        def pull(self, peer: str, ns: bytes, hashes: list[bytes], ticket: int | None = None) -> list[bool]:
            if ns == rank0 and hashes:
                raise kvtier.KvtierError("the transfer broke")
            return self.inner.pull(peer, ns, hashes, ticket)

    monkeypatch.setattr(decode.scheduler, "_background_client", lambda: AwayForRank0(background()))
    req = handed("failed-pull-decode", 9, params)
    assert decode.scheduler.get_num_new_matched_tokens(req, 0) == (None, False)
    assert isinstance(decode.scheduler._pulls[req.request_id].exception(timeout=10), kvtier.KvtierError)
    assert held_blocks(client, lambda n: n == 0) == 0
    decode.scheduler.request_finished(req, [])

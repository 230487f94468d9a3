"""kvtier's Python client against a real agent: bytes and page-layout round trips, leases, and
the failure paths an engine relies on."""

from __future__ import annotations

import ctypes
import json
import threading
import time
from pathlib import Path

import pytest

import kvtier
from kvagent_process import Agent

NS = kvtier.namespace("test/model", kv_dtype="bfloat16", block_size=16, tp_world=1)


def h(i: int) -> bytes:
    return i.to_bytes(32, "big")


class Layer:
    """One layer's KV cache: ``blocks`` pages of ``page`` bytes, ``stride`` apart."""

    def __init__(self, blocks: int, page: int, stride: int, seed: int) -> None:
        self.page, self.stride = page, stride
        self.buf = (ctypes.c_ubyte * (blocks * stride))()
        for i in range(len(self.buf)):
            self.buf[i] = (i * 31 + seed) % 251

    @property
    def spec(self) -> tuple[int, int, int]:
        return (ctypes.addressof(self.buf), self.stride, self.page)

    def block(self, i: int) -> bytes:
        return bytes(self.buf[i * self.stride : i * self.stride + self.page])

    def clear(self) -> None:
        ctypes.memset(self.buf, 0, len(self.buf))


def test_tier_codes_match_the_protocol() -> None:
    codes = (kvtier.TIER_MISS, kvtier.TIER_HOST, kvtier.TIER_DISK, kvtier.TIER_PEER, kvtier.TIER_OBJECT)
    assert codes == (0, 1, 2, 3, 4)


def test_namespace_fields_matter() -> None:
    assert len(NS) == 16
    assert kvtier.namespace("test/model", kv_dtype="bfloat16", block_size=16, tp_world=1) == NS
    salted = kvtier.namespace("test/model", kv_dtype="bfloat16", block_size=16, tp_world=1, cache_salt="x")
    assert salted != NS
    with pytest.raises(ValueError, match="tp_rank"):
        kvtier.namespace("m", tp_rank=2, tp_world=2)


def test_bytes_round_trip_and_lookup(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket))
    data = [bytes([i]) * (4096 + i) for i in range(4)]
    assert c.save(NS, [h(i) for i in range(4)], data) == ["stored"] * 4
    assert c.save(NS, [h(0)], data[:1]) == ["exists"]
    assert c.lookup(NS, [h(0), h(1), h(9), h(2)]) == [kvtier.TIER_HOST, kvtier.TIER_HOST]
    assert c.load(NS, [h(i) for i in range(5)]) == [*data, None]
    other = kvtier.namespace("test/model", cache_salt="tenant-b")
    assert c.lookup(other, [h(0)]) == []
    stats = json.loads(c.stats())
    assert stats["host"]["blocks"] == 4


def test_pages_round_trip_through_the_arena(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket))
    # Three layers, pages of different sizes, padding between blocks.
    layers = [Layer(8, 4096, 4096 + 64, seed=s) for s in (1, 2)] + [Layer(8, 2048, 2048, seed=3)]
    specs = [layer.spec for layer in layers]
    expected = {b: [layer.block(b) for layer in layers] for b in range(8)}
    assert c.save_pages(NS, [h(100 + b) for b in range(8)], list(range(8)), specs) == ["stored"] * 8
    for layer in layers:
        layer.clear()
    # Load blocks 0..8 into blocks 7..0 (reversed), so a wrong mapping cannot pass.
    tiers = c.load_pages(NS, [h(100 + b) for b in range(8)], list(reversed(range(8))), specs)
    assert tiers == [kvtier.TIER_HOST] * 8
    for b in range(8):
        assert [layer.block(7 - b) for layer in layers] == expected[b]
    # A block saved with a different layout (other length) is a miss, pages untouched.
    small = [Layer(2, 1024, 1024, seed=9)]
    before = small[0].block(0)
    assert c.load_pages(NS, [h(100)], [0], [small[0].spec]) == [kvtier.TIER_MISS]
    assert small[0].block(0) == before


def test_a_reservation_fills_layer_by_layer_then_commits(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket))
    layers = [Layer(4, 1024, 1024 + 32, seed=s) for s in (4, 5, 6)]
    expected = {b: b"".join(layer.block(b) for layer in layers) for b in range(4)}
    assert c.save(NS, [h(300)], [expected[0]]) == ["stored"]
    res = c.reserve_pages(NS, [h(300 + b) for b in range(4)], 3 * 1024)
    assert res.outcomes() == ["exists", "stored", "stored", "stored"]
    assert res.reserved() == 3
    # Nothing is visible before the commit.
    assert c.lookup(NS, [h(301)]) == []
    # Layers in a scrambled order, each at its own offset, as an engine's forward saves them.
    for i in (2, 0, 1):
        res.write_pages([0, 1, 2, 3], [layers[i].spec], offset=i * 1024)
    with pytest.raises(ValueError, match="byte 4096 of a 3072-byte block"):
        res.write_pages([0, 1, 2, 3], [layers[0].spec], offset=3 * 1024)
    with pytest.raises(ValueError, match="one block id per requested block"):
        res.write_pages([0], [layers[0].spec])
    assert c.commit(res) == ["exists", "stored", "stored", "stored"]
    assert c.load(NS, [h(300 + b) for b in range(4)]) == [expected[b] for b in range(4)]
    # An aborted reservation leaves nothing behind.
    res = c.reserve_pages(NS, [h(310)], 1024)
    res.write_pages([0], [layers[0].spec])
    c.abort(res)
    assert c.lookup(NS, [h(310)]) == []
    with pytest.raises(ValueError, match="committed or aborted already"):
        c.commit(res)


def test_a_release_during_a_copy_waits_for_it_instead_of_deadlocking(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket), timeout_ms=5000)
    blocks, page = 64, 256 << 10
    src = Layer(blocks, page, page, seed=7)
    hashes = [h(500 + b) for b in range(blocks)]
    assert c.save_pages(NS, hashes, list(range(blocks)), [src.spec]) == ["stored"] * blocks
    dst = Layer(blocks, page, page, seed=8)
    for _ in range(5):
        leases = c.acquire(NS, hashes)
        outcome: list[object] = []

        def load(leases: kvtier.Leases = leases, outcome: list[object] = outcome) -> None:
            try:
                outcome.append(leases.load_pages(list(range(blocks)), [dst.spec]))
            except ValueError as e:
                outcome.append(e)

        copy = threading.Thread(target=load, daemon=True)
        copy.start()
        c.release(leases)  # holding the GIL, while the copy may hold the leases
        copy.join(timeout=30)
        assert not copy.is_alive(), "the release and the copy deadlocked"
        # The copy ran wholly before the release, or found the leases already given back.
        (result,) = outcome
        assert result == [kvtier.TIER_HOST] * blocks or isinstance(result, ValueError), result


def test_leases_stay_readable_while_the_agent_is_dead_then_turn_stale(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket))
    layer = Layer(4, 8192, 8192, seed=5)
    assert c.save_pages(NS, [h(200), h(201)], [0, 1], [layer.spec]) == ["stored"] * 2
    want = [layer.block(0), layer.block(1)]
    leases = c.acquire(NS, [h(200), h(201), h(202)])
    assert leases.tiers() == [kvtier.TIER_HOST, kvtier.TIER_HOST, kvtier.TIER_MISS]
    assert leases.prefix_len() == 2
    # `start` skips leased blocks: leased block 1 lands in page 3.
    assert leases.load_pages([3], [layer.spec], start=1) == [kvtier.TIER_HOST]
    assert layer.block(3) == want[1]
    with pytest.raises(ValueError, match="more block ids"):
        leases.load_pages([0, 1, 2], [layer.spec], start=1)
    agent.kill()
    layer.clear()
    # Pinned blocks live in the mapped arena: still readable with the agent gone.
    assert leases.load_pages([2, 3], [layer.spec]) == [kvtier.TIER_HOST] * 2
    assert [layer.block(2), layer.block(3)] == want
    started = time.monotonic()
    with pytest.raises(kvtier.AgentUnavailable):
        c.lookup(NS, [h(200)])
    assert time.monotonic() - started < 1.0
    # The failed call ended the connection: the leases are stale now, and say so by missing.
    assert leases.load_pages([0], [layer.spec]) == [kvtier.TIER_MISS]
    c.release(leases)


def test_a_missing_agent_fails_fast_and_a_restarted_one_is_found(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket), timeout_ms=500)
    assert c.save(NS, [h(1)], [b"x" * 100]) == ["stored"]
    agent.kill()
    with pytest.raises(kvtier.AgentUnavailable):
        c.lookup(NS, [h(1)])
    agent.restart()
    assert c.lookup(NS, [h(1)]) == []
    assert c.save(NS, [h(1)], [b"x" * 100]) == ["stored"]
    with pytest.raises(kvtier.AgentUnavailable):
        kvtier.Client("/nonexistent/kvtier.sock", lazy=False)


def test_announcements_reach_the_agent_and_survive_its_restart(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket))
    c.announce(NS, "served-model")
    c.announce(NS, "served-model")
    assert json.loads(c.stats())["announced_namespaces"] == 1
    agent.kill()
    agent.restart()
    # The restarted agent knows nothing; the client announces again when it reconnects.
    assert json.loads(c.stats())["announced_namespaces"] == 1
    with pytest.raises(ValueError, match="model name"):
        c.announce(NS, "")


def test_invalid_arguments_are_value_errors(agent: Agent) -> None:
    c = kvtier.Client(str(agent.socket))
    with pytest.raises(ValueError, match="16 bytes"):
        c.lookup(b"short", [h(1)])
    with pytest.raises(ValueError, match="hash 0"):
        c.lookup(NS, [b""])
    with pytest.raises(ValueError, match="layer"):
        c.save_pages(NS, [h(1)], [0], [])
    with pytest.raises(ValueError, match="one block id per hash"):
        c.save_pages(NS, [h(1), h(2)], [0], [(1, 1, 1)])


def test_pull_copies_another_agents_blocks(agent: Agent, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("py-cluster")
    # Port 0: the agent binds free ports itself (nothing can take them first) and says which.
    args = ["--peer-listen", "127.0.0.1:0", "--peer-secret-file", str(secret)]
    source = Agent(tmp_path / "src.sock", args)
    peer = json.loads(kvtier.Client(str(source.socket)).stats())["peer"]["address"]
    puller = Agent(tmp_path / "dst.sock", ["--peer-secret-file", str(secret)])
    try:
        blocks = [bytes([i]) * 4096 for i in range(4)]
        src = kvtier.Client(str(source.socket))
        assert src.save(NS, [h(i) for i in range(4)], blocks) == ["stored"] * 4
        dst = kvtier.Client(str(puller.socket), timeout_ms=5000)
        wanted = [h(i) for i in range(6)]
        # Held for a decode's pull under a ticket, which the producer can also end itself.
        assert src.hold(NS, wanted, ticket=7) == ([kvtier.TIER_HOST] * 4, 4)
        assert src.unhold(NS, 7) == 4
        assert src.hold(NS, wanted, ticket=8)[1] == 4
        with pytest.raises(ValueError, match="not 0"):
            src.hold(NS, wanted, ticket=0)
        with pytest.raises(ValueError, match="not 0"):
            src.unhold(NS, 0)
        # The puller's node has the first block: only the ticket ends its hold at the source.
        assert dst.save(NS, [h(0)], blocks[:1]) == ["stored"]
        assert dst.pull(peer, NS, wanted, ticket=8) == [True] * 4 + [False] * 2
        assert dst.lookup(NS, wanted) == [kvtier.TIER_HOST] * 4
        # The pull's release (sent after it returns) ends ticket 8's holds, block 0's included.
        deadline = time.monotonic() + 10
        while json.loads(src.stats())["peer"]["held_blocks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(src.stats())["peer"]["held_blocks"] == 0
        # The agent at `agent` has no secret configured: it refuses, and keeps serving.
        bare = kvtier.Client(str(agent.socket))
        with pytest.raises(kvtier.KvtierError, match=r"peer\.secret_file"):
            bare.pull(peer, NS, wanted)
        assert bare.lookup(NS, wanted) == []
    finally:
        source.kill()
        puller.kill()

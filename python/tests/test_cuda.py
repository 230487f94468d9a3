"""The CUDA copy engine on a real GPU, through a real agent: pages of torch CUDA tensors in the
layouts vLLM uses, saved into arena slots and loaded back, byte for byte; copies ordered after
the caller's stream and before what is queued on it afterwards; unaligned pages; and the same
with the copy kernel turned off. Skipped, with the reason, where torch or a CUDA device is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvagent_process import Agent

torch: Any = pytest.importorskip("torch", reason="torch is not installed: these tests need a CUDA device")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

NS = kvtier.namespace("test/cuda", kv_dtype="uint8", block_size=16, tp_world=1)
# About 50 ms of GPU time at H100 clocks: long enough that a copy not ordered behind it is seen.
SLEEP_CYCLES = 100_000_000


@dataclass
class Layer:
    """One layer's pages: page `i` is `flat[offset + i * stride :][:page]`."""

    flat: Any
    offset: int
    stride: int
    page: int

    def spec(self) -> tuple[int, int, int]:
        return (int(self.flat.data_ptr()) + self.offset, self.stride, self.page)

    def view(self, block: int) -> Any:
        start = self.offset + block * self.stride
        return self.flat[start : start + self.page]


def random_flat(n: int) -> Any:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")


def kv_layers(blocks: int) -> list[Layer]:
    """Layers as vLLM lays them out: K and V in separate halves of one tensor, K and V
    interleaved per block (stride twice the page), and a page longer than one kernel piece."""
    out = []
    page = 16 << 10
    kv = random_flat(2 * blocks * page)
    out += [Layer(kv, 0, page, page), Layer(kv, blocks * page, page, page)]
    inter = random_flat(blocks * 2 * page)
    out += [Layer(inter, 0, 2 * page, page), Layer(inter, page, 2 * page, page)]
    big = 640 << 10
    out.append(Layer(random_flat(blocks * big), 0, big, big))
    return out


def block_bytes(layers: list[Layer], block: int) -> bytes:
    return b"".join(bytes(layer.view(block).cpu().numpy()) for layer in layers)


def specs(layers: list[Layer]) -> list[tuple[int, int, int]]:
    return [layer.spec() for layer in layers]


def hashes(n: int, salt: int) -> list[bytes]:
    return [(salt << 32 | i).to_bytes(32, "big") for i in range(n)]


@pytest.fixture
def engine() -> Any:
    e = kvtier.CopyEngine("cuda:0")
    assert e.asynchronous
    return e


def test_the_copy_kernel_is_used(engine: Any) -> None:
    assert "copy kernel" in engine.describe(), engine.describe()


def round_trip(socket: str, engine: Any) -> None:
    """Saves scattered blocks of every layout, reads them over the socket, loads them elsewhere."""
    c = kvtier.Client(socket, timeout_ms=10_000)
    blocks, n = 24, 8
    layers = kv_layers(blocks)
    size = sum(layer.page for layer in layers)
    picks, others = [17, 3, 9, 0, 22, 5, 11, 14], [1, 2, 4, 6, 7, 8, 10, 12]
    keys = hashes(n, 1)
    torch.cuda.synchronize()
    expected = [block_bytes(layers, b) for b in picks]

    # Saved in two calls, as vLLM saves layer by layer: the first layers at the slot's start,
    # the rest after them.
    r = c.reserve_pages(NS, keys, size)
    assert r.reserved() == n
    r.write_pages(picks, specs(layers[:2]), 0, engine, 0)
    r.write_pages(picks, specs(layers[2:]), layers[0].page + layers[1].page, engine, 0)
    r.wait()
    assert c.commit(r) == ["stored"] * n
    # What the arena holds, read over the socket: the pages one after another.
    assert c.load(NS, keys) == expected

    leases = c.acquire(NS, keys)
    assert leases.load_pages(others, specs(layers), 0, engine, 0, False) == [kvtier.TIER_HOST] * n
    leases.wait()
    c.release(leases)
    torch.cuda.synchronize()
    assert [block_bytes(layers, b) for b in others] == expected
    # Blocks the load was not given are untouched.
    for layer in layers:
        assert not torch.equal(layer.view(13), layer.view(17))


def save_in_stream_order(socket: str, engine: Any) -> None:
    """Saves pages that work queued on a side stream (after a long sleep) writes."""
    c = kvtier.Client(socket, timeout_ms=10_000)
    layers = kv_layers(8)
    fresh = [random_flat(layer.flat.numel()) for layer in layers]
    keys = hashes(4, 2)
    r = c.reserve_pages(NS, keys, sum(layer.page for layer in layers))
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        for layer, new in zip(layers, fresh, strict=True):
            layer.flat.copy_(new)
        r.write_pages([4, 5, 6, 7], specs(layers), 0, engine, stream.cuda_stream)
    r.wait()
    assert c.commit(r) == ["stored"] * 4
    stream.synchronize()
    assert c.load(NS, keys) == [block_bytes(layers, b) for b in [4, 5, 6, 7]]


def load_in_stream_order(socket: str, engine: Any) -> None:
    """Loads after work queued on a side stream, and work queued after the load sees it."""
    c = kvtier.Client(socket, timeout_ms=10_000)
    layers = kv_layers(8)
    keys = hashes(2, 3)
    torch.cuda.synchronize()
    saved = [block_bytes(layers, b) for b in [0, 1]]
    assert c.save_pages(NS, keys, [0, 1], specs(layers), engine, 0) == ["stored"] * 2
    for layer in layers:
        layer.flat.zero_()
    torch.cuda.synchronize()
    leases = c.acquire(NS, keys)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        before = [layer.view(6).clone() for layer in layers]
        leases.load_pages([6, 7], specs(layers), 0, engine, stream.cuda_stream, True)
        after = [torch.cat([layer.view(b) for layer in layers]).clone() for b in [6, 7]]
    stream.synchronize()
    c.release(leases)
    assert all(int(b.count_nonzero()) == 0 for b in before), "the load overtook the stream's work"
    assert [bytes(a.cpu().numpy()) for a in after] == saved, "work queued after the load ran first"


def unaligned_round_trip(socket: str, engine: Any) -> None:
    """Pages neither 16-byte long nor 16-byte aligned (the kernel's byte path)."""
    c = kvtier.Client(socket, timeout_ms=10_000)
    page, blocks = 4100, 6
    flat = random_flat(page * blocks + 7)
    layers = [Layer(flat, 3, page, page)]
    keys = hashes(3, 4)
    torch.cuda.synchronize()
    saved = [block_bytes(layers, b) for b in [5, 0, 2]]
    assert c.save_pages(NS, keys, [5, 0, 2], specs(layers), engine, 0) == ["stored"] * 3
    assert c.load(NS, keys) == saved
    assert c.load_pages(NS, keys, [1, 3, 4], specs(layers), engine, 0) == [kvtier.TIER_HOST] * 3
    torch.cuda.synchronize()
    assert [block_bytes(layers, b) for b in [1, 3, 4]] == saved


def many_round_trip(socket: str, engine: Any) -> None:
    """Saves of several requests written layer by layer, each layer in one call for all."""
    c = kvtier.Client(socket, timeout_ms=10_000)
    layers = kv_layers(12)
    size = sum(layer.page for layer in layers)
    picks = [[7, 1], [4], [10, 2, 5]]
    reservations = [c.reserve_pages(NS, hashes(len(p), 5 + n), size) for n, p in enumerate(picks)]
    torch.cuda.synchronize()
    offset = 0
    for layer in layers:
        kvtier.write_pages_many(reservations, picks, [layer.spec()], offset, engine, 0)
        offset += layer.page
    for r, p in zip(reservations, picks, strict=True):
        assert c.commit(r) == ["stored"] * len(p)
    for n, p in enumerate(picks):
        assert c.load(NS, hashes(len(p), 5 + n)) == [block_bytes(layers, b) for b in p]


# Each runs with the copy kernel (below) and again without it (in a child process).
CHECKS = (round_trip, many_round_trip, save_in_stream_order, load_in_stream_order, unaligned_round_trip)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_with_the_copy_kernel(agent: Agent, engine: Any, check: Callable[[str, Any], None]) -> None:
    check(str(agent.socket), engine)


def test_without_the_copy_kernel_pages_round_trip(agent: Agent) -> None:
    # The engine reads the switch when it opens: another process opens it with the switch off.
    child = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import kvtier, test_cuda
engine = kvtier.CopyEngine("cuda:0")
assert "one memcpy per page" in engine.describe(), engine.describe()
for check in test_cuda.CHECKS:
    check({str(agent.socket)!r}, engine)
print("ROUND TRIPS OK")
"""
    env = dict(os.environ, KVTIER_CUDA_COPY_KERNEL="off")
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ROUND TRIPS OK" in out.stdout, out.stdout + out.stderr

"""Benchmark NVIDIA Dynamo's KV-router radix tree on the workload of kvstore's index bench.

Dynamo (``ai-dynamo-runtime``, installed by ``benches/dynamo/setup.sh``) exposes its
KV-router indexer to Python as ``dynamo.llm.RadixTree``:

* ``apply_event(worker_id, event_bytes)`` takes one JSON-serialized ``KvCacheEvent``:
  ``{"event_id": n, "data": {"stored": {"parent_hash": h | null, "blocks":
  [{"block_hash": h, "tokens_hash": t}, ...]}}}`` stores a chain (each block is the
  parent of the next; ``parent_hash`` is the ``block_hash`` of the first block's parent),
  and ``{"event_id": n, "data": {"removed": {"block_hashes": [h, ...]}}}`` removes
  blocks. ``block_hash`` is the engine's sequence hash (the chain key),
  ``tokens_hash`` the hash of the block's own tokens (the tree's edge key).
* ``find_matches(tokens_hashes, early_exit=False)`` walks a prompt's ``tokens_hash``
  sequence and returns ``OverlapScores``, whose ``scores`` maps
  ``(worker_id, dp_rank)`` to the number of leading prompt blocks that worker holds.

Each call goes from Python through the binding to the tree's own thread and back, and
``apply_event`` also parses JSON there: the numbers below are what a Python router
using this API pays, binding included.

Measured:

* ingest: one worker alternately stores and removes the same chain of 1024 blocks, one
  event each (as kvstore's ``ingest`` bench does). Events are serialized before timing;
  each ``apply_event`` is timed on its own. Reported as block events per second.
* score: 100 workers, each holding its own chain (10 000 blocks by default, so 1 M
  indexed blocks; ``--blocks-per-worker 2000`` gives kvstore's bench size), plus a
  512-block prompt of which workers 0, 1 and 2 hold the first 512, 300 and 100 blocks.
  ``find_matches`` of the prompt is timed call by call; p50 and p99 are reported. The
  answer is checked ({0: 512, 1: 300, 2: 100} and no other worker).
* score, dense (unless ``--no-dense``): as above, but worker ``w`` holds the first
  ``5 w`` prompt blocks, so every worker but 0 holds part of the prompt.
* empty-tree baseline: ``find_matches`` of the same prompt on an empty tree (the walk
  stops at the first block), an estimate of the cost of one call through the binding,
  converting the 512 hashes included.

Output: one JSON line on stdout, a readable summary on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SYSTEM = "dynamo-radix-tree"
PACKAGE = "ai-dynamo-runtime"
PROMPT_BLOCKS = 512
EXPECTED_TYPICAL = {0: 512, 1: 300, 2: 100}
MASK64 = (1 << 64) - 1


class Matches(Protocol):
    """What ``RadixTree.find_matches`` returns (``OverlapScores``)."""

    @property
    def scores(self) -> Mapping[Any, int]:
        """Matched prompt blocks by ``(worker_id, dp_rank)``."""
        ...


class Tree(Protocol):
    """The part of ``dynamo.llm.RadixTree`` used here."""

    def apply_event(self, worker_id: int, kv_cache_event_bytes: bytes) -> None:
        """Apply one JSON-serialized ``KvCacheEvent`` from ``worker_id``."""
        ...

    def find_matches(self, sequence: list[int], early_exit: bool = False) -> Matches:
        """Score each worker by the leading blocks of ``sequence`` it holds."""
        ...


def mix64(x: int) -> int:
    """SplitMix64 finalizer: a well-spread, collision-free u64 for each u64 input."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class Chain:
    """A chain of blocks: sequence hashes (``block_hash``) and token hashes."""

    block_hashes: list[int]
    tokens_hashes: list[int]


def make_chain(stream: int, n: int) -> Chain:
    """``n`` blocks of chain ``stream``; distinct streams share no hash."""
    base = stream << 40
    return Chain(
        block_hashes=[mix64(base | (i << 1)) for i in range(n)],
        tokens_hashes=[mix64(base | (i << 1) | 1) for i in range(n)],
    )


class EventIds:
    """Monotonic event ids, as an engine's event stream would number them."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next


def stored_event(event_id: int, parent: int | None, chain: Chain, lo: int, hi: int) -> bytes:
    """A BlockStored event of blocks ``lo..hi`` of ``chain``, chained under ``parent``."""
    blocks = [
        {"block_hash": b, "tokens_hash": t}
        for b, t in zip(chain.block_hashes[lo:hi], chain.tokens_hashes[lo:hi], strict=True)
    ]
    event = {"event_id": event_id, "data": {"stored": {"parent_hash": parent, "blocks": blocks}}}
    return json.dumps(event, separators=(",", ":")).encode()


def removed_event(event_id: int, block_hashes: Sequence[int]) -> bytes:
    """A BlockRemoved event of ``block_hashes``."""
    event = {"event_id": event_id, "data": {"removed": {"block_hashes": list(block_hashes)}}}
    return json.dumps(event, separators=(",", ":")).encode()


def store_chain(tree: Tree, ids: EventIds, worker: int, chain: Chain, n: int, per_event: int) -> None:
    """Store the first ``n`` blocks of ``chain`` on ``worker``, ``per_event`` blocks an event."""
    apply = tree.apply_event
    parent: int | None = None
    for lo in range(0, n, per_event):
        hi = min(lo + per_event, n)
        apply(worker, stored_event(ids.take(), parent, chain, lo, hi))
        parent = chain.block_hashes[hi - 1]


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted samples, in microseconds."""
    rank = max(1, min(len(sorted_ns), math.ceil(q * len(sorted_ns))))
    return sorted_ns[rank - 1] / 1e3


def time_calls(call: Callable[[], object], warmup: int, iters: int) -> list[int]:
    """Sorted per-call durations in ns, GC paused while timing."""
    for _ in range(warmup):
        call()
    samples = [0] * iters
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(iters):
            t0 = clock()
            call()
            samples[i] = clock() - t0
    finally:
        gc.enable()
    samples.sort()
    return samples


def scores_by_worker(result: Matches) -> dict[int, int]:
    """``OverlapScores.scores`` keyed by worker id (all events here use dp_rank 0)."""
    out: dict[int, int] = {}
    for key, score in result.scores.items():
        worker, dp_rank = key if isinstance(key, tuple) else (key, 0)
        if dp_rank != 0:
            raise SystemExit(f"unexpected dp_rank {dp_rank} in scores {dict(result.scores)}")
        out[int(worker)] = int(score)
    return out


@dataclass(frozen=True)
class Ingest:
    """Result of the ingest bench."""

    events: int
    block_events: int
    seconds: float
    stored_p50_us: float
    removed_p50_us: float

    @property
    def per_s(self) -> float:
        return self.block_events / self.seconds


def bench_ingest(radix_tree: Callable[[], Tree], pairs: int, blocks: int, warmup: int) -> Ingest:
    """Alternately store and remove one ``blocks``-block chain on one worker ``pairs`` times."""
    tree = radix_tree()
    chain = make_chain(1 << 20, blocks)
    ids = EventIds()
    worker = 7
    # Pre-serialize events; only the event id differs between repetitions.
    stored_tail = stored_event(0, None, chain, 0, blocks)[len(b'{"event_id":0') :]
    removed_tail = removed_event(0, chain.block_hashes)[len(b'{"event_id":0') :]
    total = 2 * (warmup + pairs)
    events = [
        b'{"event_id":%d' % ids.take() + (stored_tail if i % 2 == 0 else removed_tail) for i in range(total)
    ]
    apply = tree.apply_event
    for ev in events[: 2 * warmup]:
        apply(worker, ev)
    stored_ns: list[int] = []
    removed_ns: list[int] = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i, ev in enumerate(events[2 * warmup :]):
            t0 = clock()
            apply(worker, ev)
            (stored_ns if i % 2 == 0 else removed_ns).append(clock() - t0)
    finally:
        gc.enable()
    # The chain must be gone after the last removal, and present after a store.
    if scores_by_worker(tree.find_matches(chain.tokens_hashes)):
        raise SystemExit("ingest: blocks still indexed after the final removal")
    apply(worker, b'{"event_id":%d' % ids.take() + stored_tail)
    got = scores_by_worker(tree.find_matches(chain.tokens_hashes))
    if got != {worker: blocks}:
        raise SystemExit(f"ingest: after a store, expected {{{worker}: {blocks}}}, got {got}")
    seconds = (sum(stored_ns) + sum(removed_ns)) / 1e9
    return Ingest(
        events=2 * pairs,
        block_events=2 * pairs * blocks,
        seconds=seconds,
        stored_p50_us=statistics.median(stored_ns) / 1e3,
        removed_p50_us=statistics.median(removed_ns) / 1e3,
    )


@dataclass(frozen=True)
class Score:
    """Result of one scoring bench."""

    indexed_blocks: int
    build_s: float
    p50_us: float
    p99_us: float
    mean_us: float


def bench_score(
    radix_tree: Callable[[], Tree],
    workers: int,
    own_blocks: int,
    per_event: int,
    prefix: Callable[[int], int],
    warmup: int,
    iters: int,
) -> Score:
    """Index ``workers`` workers and time ``find_matches`` of the 512-block prompt."""
    tree = radix_tree()
    ids = EventIds()
    prompt = make_chain(0, PROMPT_BLOCKS)
    expected: dict[int, int] = {}
    indexed = 0
    t0 = time.perf_counter()
    for w in range(workers):
        store_chain(tree, ids, w, make_chain(w + 1, own_blocks), own_blocks, per_event)
        indexed += own_blocks
        n = min(prefix(w), PROMPT_BLOCKS)
        if n > 0:
            store_chain(tree, ids, w, prompt, n, per_event)
            indexed += n
            expected[w] = n
    build_s = time.perf_counter() - t0

    query = prompt.tokens_hashes
    got = scores_by_worker(tree.find_matches(query))
    if got != expected:
        workers_seen = set(got) | set(expected)
        wrong = {w: (got.get(w), expected.get(w)) for w in workers_seen if got.get(w) != expected.get(w)}
        raise SystemExit(f"score: wrong answer, worker: (got, expected) = {wrong}")
    # Each worker's own chain is found too (spot check of the first, middle and last).
    for w in {0, workers // 2, workers - 1}:
        own = make_chain(w + 1, own_blocks).tokens_hashes
        got_own = scores_by_worker(tree.find_matches(own))
        if got_own != {w: own_blocks}:
            raise SystemExit(f"score: worker {w}'s own chain scored {got_own}")

    find = tree.find_matches
    samples = time_calls(lambda: find(query), warmup, iters)
    return Score(
        indexed_blocks=indexed,
        build_s=build_s,
        p50_us=percentile(samples, 0.50),
        p99_us=percentile(samples, 0.99),
        mean_us=sum(samples) / len(samples) / 1e3,
    )


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small run: 1000 blocks a worker, 200 calls")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument(
        "--blocks-per-worker", type=int, help="own blocks a worker (default 10000; quick 1000)"
    )
    parser.add_argument("--event-blocks", type=int, default=1024, help="blocks per stored event")
    parser.add_argument("--ingest-pairs", type=int, help="store+remove pairs timed (default 2000, quick 200)")
    parser.add_argument("--score-iters", type=int, help="timed find_matches calls (default 2000, quick 200)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 200, quick 20)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense scoring case")
    args = parser.parse_args(argv)

    quick: bool = args.quick
    own_blocks: int = args.blocks_per_worker or (1_000 if quick else 10_000)
    pairs: int = args.ingest_pairs or (200 if quick else 2_000)
    iters: int = args.score_iters or (200 if quick else 2_000)
    warmup: int = args.warmup if args.warmup is not None else (20 if quick else 200)
    workers: int = args.workers
    if workers < 3:
        parser.error("--workers must be at least 3 (workers 0, 1, 2 hold the prompt)")

    # Dynamo logs through tracing; keep skipped-operation warnings out of the output.
    os.environ.setdefault("DYN_LOG", "error")
    try:
        from dynamo.llm import RadixTree
    except ImportError as e:
        hint = "run benches/dynamo/setup.sh"
        print(f"{SYSTEM}: cannot import dynamo.llm.RadixTree ({e}); {hint}", file=sys.stderr)
        return 3

    started = time.perf_counter()
    ingest = bench_ingest(RadixTree, pairs, args.event_blocks, warmup=max(1, warmup // 10))
    typical = bench_score(
        RadixTree, workers, own_blocks, args.event_blocks, lambda w: EXPECTED_TYPICAL.get(w, 0), warmup, iters
    )
    dense = None
    if not args.no_dense:
        dense = bench_score(RadixTree, workers, own_blocks, args.event_blocks, lambda w: 5 * w, warmup, iters)
    empty_tree = RadixTree()
    prompt = make_chain(0, PROMPT_BLOCKS).tokens_hashes
    empty = time_calls(lambda: empty_tree.find_matches(prompt), warmup, iters)
    elapsed = time.perf_counter() - started

    notes = (
        "dynamo.llm.RadixTree via Python; ingest: 1 worker alternately stores and removes one "
        f"{args.event_blocks}-block chained event ({pairs} pairs; JSON pre-serialized, "
        "its parse inside apply_event timed); "
        f"score: find_matches(512 tokens_hashes), {workers} workers x {own_blocks} own blocks "
        "+ prompt prefixes 512/300/100 on workers 0/1/2, answer checked; "
        f"{iters} timed calls after {warmup} warm-up; "
        "times include the Python binding and the round trip to the tree's thread"
    )
    record = {
        "system": SYSTEM,
        "version": installed_version(),
        "ingest_block_events_per_s": round(ingest.per_s),
        "score_p50_us": round(typical.p50_us, 2),
        "score_p99_us": round(typical.p99_us, 2),
        "indexed_blocks": typical.indexed_blocks,
        "workers": workers,
        "blocks_per_worker": own_blocks,
        "score_dense_p50_us": round(dense.p50_us, 2) if dense else None,
        "score_dense_p99_us": round(dense.p99_us, 2) if dense else None,
        "empty_tree_find_matches_p50_us": round(percentile(empty, 0.50), 2),
        "quick": quick,
        "notes": notes,
    }
    print(json.dumps(record), flush=True)

    err = sys.stderr
    print(f"{SYSTEM} {record['version']} ({'quick' if quick else 'full'} run, {elapsed:.1f} s)", file=err)
    print(
        f"  ingest: {ingest.per_s / 1e6:.2f} M block events/s over {ingest.events} events of "
        f"{args.event_blocks} blocks (p50 per event: stored {ingest.stored_p50_us:.0f} us, "
        f"removed {ingest.removed_p50_us:.0f} us)",
        file=err,
    )
    print(
        f"  score, 3 of {workers} workers hold the prompt ({typical.indexed_blocks:,} blocks indexed, "
        f"built in {typical.build_s:.1f} s): p50 {typical.p50_us:.1f} us, p99 {typical.p99_us:.1f} us, "
        f"mean {typical.mean_us:.1f} us",
        file=err,
    )
    if dense:
        print(
            f"  score, every worker holds 5w prompt blocks ({dense.indexed_blocks:,} blocks indexed): "
            f"p50 {dense.p50_us:.1f} us, p99 {dense.p99_us:.1f} us",
            file=err,
        )
    print(f"  find_matches on an empty tree (binding cost): p50 {percentile(empty, 0.50):.1f} us", file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

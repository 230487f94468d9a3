"""`kvbench gpu`: kvtier's CUDA copy engine between torch CUDA tensors shaped like vLLM's KV
caches and a real agent's arena, next to torch's own pinned-memory copies in the same run.

For each block size, `--layers` device tensors of shape [num_blocks, page] (page = block /
layers: one vLLM layer's page of a block) hold `--batch` blocks at scattered ids. Measured, each
the median of `--reps`, timed on the host around the copies and their completion:

- kvtier save: `Reservation.write_pages` of all layers into arena slots, then `wait`;
- kvtier load: `Leases.load_pages` from the slots into other blocks, then `wait`;
- torch per page: `copy_(non_blocking=True)` of every page into / out of a pinned tensor (what
  a connector without a copy engine does);
- contiguous: one `copy_` of the same bytes between one device tensor and one pinned tensor
  (the pinned cudaMemcpy ceiling the target is set against).

Every block is checked byte for byte after a save and a load into different blocks.

Then the host time of layer-by-layer saves, as the vLLM connector makes them: for a step in
which some requests save some blocks each, 64 layers of 32 KiB pages, every layer written after
the step's slots are reserved, then everything committed; once with a `write_pages` call per
request and layer, once with one `write_pages_many` call per layer (the connector's way).

Prints tables on stderr and one JSON object on stdout; exits 3 (with the reason) when torch,
kvtier or a CUDA device is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20]


def timed(torch: Any, fn: Callable[[], None], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    secs = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    return statistics.median(secs)


def measure(
    torch: Any, kvtier: Any, client: Any, engine: Any, size: int, a: argparse.Namespace
) -> dict[str, Any]:
    dev = torch.device("cuda:0")
    page = size // a.layers
    blocks = a.batch * 4
    caches = [torch.randint(0, 255, (blocks, page), dtype=torch.uint8, device=dev) for _ in range(a.layers)]
    layers = [(int(c.data_ptr()), page, page) for c in caches]
    picks = torch.randperm(blocks)[: a.batch].tolist()
    others = [b for b in range(blocks) if b not in set(picks)][: a.batch]
    ns = kvtier.namespace("kvbench/gpu", kv_dtype="uint8", block_size=size)
    hashes = [(size << 20 | i).to_bytes(32, "big") for i in range(a.batch)]
    stream = int(torch.cuda.current_stream().cuda_stream)

    reservation = client.reserve_pages(ns, hashes, size)
    if reservation.reserved() != a.batch:
        raise SystemExit(f"the agent gave {reservation.reserved()} of {a.batch} slots: raise --arena")

    def save() -> None:
        reservation.write_pages(picks, layers, 0, engine, stream)
        reservation.wait()

    save_s = timed(torch, save, a.reps)
    if client.commit(reservation) != ["stored"] * a.batch:
        raise SystemExit("the agent did not keep every block")
    leases = client.acquire(ns, hashes)

    def load() -> None:
        leases.load_pages(others, layers, 0, engine, stream)
        leases.wait()

    load_s = timed(torch, load, a.reps)
    torch.cuda.synchronize()
    for c in caches:
        assert torch.equal(c[others], c[picks]), "a block came back different"
    client.release(leases)

    pinned = [torch.empty((a.batch, page), dtype=torch.uint8, pin_memory=True) for _ in range(a.layers)]

    def torch_d2h() -> None:
        for c, p in zip(caches, pinned, strict=True):
            for i, b in enumerate(picks):
                p[i].copy_(c[b], non_blocking=True)

    def torch_h2d() -> None:
        for c, p in zip(caches, pinned, strict=True):
            for i, b in enumerate(others):
                c[b].copy_(p[i], non_blocking=True)

    flat_dev = torch.empty((a.batch * size,), dtype=torch.uint8, device=dev)
    flat_host = torch.empty((a.batch * size,), dtype=torch.uint8, pin_memory=True)
    total = a.batch * size

    def contiguous_d2h() -> None:
        flat_host.copy_(flat_dev, non_blocking=True)

    def contiguous_h2d() -> None:
        flat_dev.copy_(flat_host, non_blocking=True)

    row = {
        "block_bytes": size,
        "page_bytes": page,
        "batch": a.batch,
        "kvtier_save_gbps": total / save_s / 1e9,
        "kvtier_load_gbps": total / load_s / 1e9,
        "torch_per_page_d2h_gbps": total / timed(torch, torch_d2h, a.reps) / 1e9,
        "torch_per_page_h2d_gbps": total / timed(torch, torch_h2d, a.reps) / 1e9,
        "contiguous_d2h_gbps": total / timed(torch, contiguous_d2h, a.reps) / 1e9,
        "contiguous_h2d_gbps": total / timed(torch, contiguous_h2d, a.reps) / 1e9,
    }
    row["save_vs_contiguous"] = row["kvtier_save_gbps"] / row["contiguous_d2h_gbps"]
    row["load_vs_contiguous"] = row["kvtier_load_gbps"] / row["contiguous_h2d_gbps"]
    row["save_vs_torch"] = row["kvtier_save_gbps"] / row["torch_per_page_d2h_gbps"]
    row["load_vs_torch"] = row["kvtier_load_gbps"] / row["torch_per_page_h2d_gbps"]
    return row


LAYERWISE = [(1, 16), (8, 1), (8, 16), (32, 1)]


def layerwise(torch: Any, kvtier: Any, client: Any, engine: Any, steps: int) -> list[dict[str, Any]]:
    layers, page = 64, 32 << 10
    most = max(requests * blocks for requests, blocks in LAYERWISE)
    caches = [torch.randint(0, 255, (most, page), dtype=torch.uint8, device="cuda:0") for _ in range(layers)]
    specs = [(int(c.data_ptr()), page, page) for c in caches]
    ns = kvtier.namespace("kvbench/gpu-layerwise", kv_dtype="uint8", block_size=16)
    stream = int(torch.cuda.current_stream().cuda_stream)
    rows = []
    salt = 0
    for batched in (False, True):
        for requests, blocks in LAYERWISE:
            ids = [list(range(q * blocks, (q + 1) * blocks)) for q in range(requests)]
            calls: list[float] = []
            writes: list[float] = []
            whole: list[float] = []
            for step in range(steps + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                reservations = []
                for _ in range(requests):
                    salt += 1
                    keys = [(salt << 16 | i).to_bytes(32, "big") for i in range(blocks)]
                    reservations.append(client.reserve_pages(ns, keys, layers * page))
                t1 = time.perf_counter()
                for n, spec in enumerate(specs):
                    if batched:
                        t = time.perf_counter()
                        kvtier.write_pages_many(reservations, ids, [spec], n * page, engine, stream)
                        calls.append(time.perf_counter() - t)
                        continue
                    for r, b in zip(reservations, ids, strict=True):
                        t = time.perf_counter()
                        r.write_pages(b, [spec], n * page, engine, stream)
                        calls.append(time.perf_counter() - t)
                t2 = time.perf_counter()
                for r in reservations:
                    client.commit(r)
                if step >= 2:  # the first steps warm up
                    writes.append(t2 - t1)
                    whole.append(time.perf_counter() - t0)
            rows.append(
                {
                    "requests": requests,
                    "blocks": blocks,
                    "layers": layers,
                    "page_bytes": page,
                    "one_call_per_layer": batched,
                    "call_p50_us": statistics.median(calls) * 1e6,
                    "writes_us": statistics.median(writes) * 1e6,
                    "step_us": statistics.median(whole) * 1e6,
                }
            )
            row = rows[-1]
            print(
                f"{'one call per layer' if batched else 'a call per request and layer'}: "
                f"{requests} requests x {blocks} blocks: call {row['call_p50_us']:.1f} us, "
                f"writes {row['writes_us'] / 1e3:.2f} ms, step {row['step_us'] / 1e3:.2f} ms",
                file=sys.stderr,
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True, help="the kvagent node socket")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    try:
        import torch

        import kvtier
    except ImportError as e:
        print(json.dumps({"skipped": f"this Python lacks torch or kvtier: {e}"}))
        sys.exit(3)
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "torch sees no CUDA device"}))
        sys.exit(3)
    engine = kvtier.CopyEngine("cuda:0")
    client = kvtier.Client(a.socket, timeout_ms=10_000)
    facts = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "engine": engine.describe()}
    print(f"{facts['device']}; {facts['engine']}", file=sys.stderr)
    rows = []
    for size in SIZES:
        r = measure(torch, kvtier, client, engine, size, a)
        rows.append(r)
        print(
            f"{size >> 10:>5} KiB ({a.layers} pages) x {a.batch}: save {r['kvtier_save_gbps']:.1f} GB/s "
            f"({r['save_vs_contiguous']:.0%} of contiguous, {r['save_vs_torch']:.2f}x torch), "
            f"load {r['kvtier_load_gbps']:.1f} GB/s ({r['load_vs_contiguous']:.0%}, "
            f"{r['load_vs_torch']:.2f}x torch)",
            file=sys.stderr,
        )
    steps = layerwise(torch, kvtier, client, engine, max(a.reps // 2, 3))
    print(json.dumps({"environment": facts, "results": rows, "layerwise": steps}))


if __name__ == "__main__":
    main()

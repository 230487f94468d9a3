"""The baseline of `kvbench gpu`: what torch's own copies between a CUDA device and pinned host
memory reach, for KV blocks of 64 KiB to 4 MiB, and what the machine offers a copy engine
(driver, libcuda, devices). Prints one JSON line on stdout and a table on stderr.

Each measurement copies `--batch` blocks that sit at scattered offsets of a device tensor
shaped like a vLLM KV cache layer ([2, num_blocks, block_bytes]) into consecutive slots of a
pinned host tensor (device -> host), or back (host -> device), with `tensor.copy_(...,
non_blocking=True)` per block on one stream, timed with CUDA events; next to it, one copy of
the same bytes as a single contiguous transfer (the pinned cudaMemcpy ceiling).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import subprocess
import sys
from typing import Any

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20]


def environment() -> dict[str, Any]:
    facts: dict[str, Any] = {"libcuda": ctypes.util.find_library("cuda")}
    try:
        ctypes.CDLL("libcuda.so.1")
        facts["libcuda_loads"] = True
    except OSError as e:
        facts["libcuda_loads"] = str(e)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--format=csv,noheader",
             "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        facts["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        facts["nvidia_smi"] = str(e)
    return facts


def measure(torch: Any, size: int, batch: int, reps: int) -> dict[str, Any]:
    """One block size: per-block copies of scattered blocks, and one contiguous copy."""
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    cache = torch.randint(0, 255, (batch * 4, size), dtype=torch.uint8, device=dev)
    host = torch.empty((batch, size), dtype=torch.uint8, pin_memory=True)
    picks = torch.randperm(batch * 4)[:batch].tolist()
    flat_dev = torch.empty((batch * size,), dtype=torch.uint8, device=dev)
    flat_host = torch.empty((batch * size,), dtype=torch.uint8, pin_memory=True)

    def timed(fn: Any) -> float:
        with torch.cuda.stream(stream):
            fn()  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            secs = []
            for _ in range(reps):
                start.record(stream)
                fn()
                end.record(stream)
                end.synchronize()
                secs.append(start.elapsed_time(end) / 1e3)
        secs.sort()
        return float(batch * size / secs[len(secs) // 2] / 1e9)

    def d2h() -> None:
        for i, b in enumerate(picks):
            host[i].copy_(cache[b], non_blocking=True)

    def h2d() -> None:
        for i, b in enumerate(picks):
            cache[b].copy_(host[i], non_blocking=True)

    row = {
        "block_bytes": size,
        "batch": batch,
        "torch_per_block_d2h_gbps": timed(d2h),
        "torch_per_block_h2d_gbps": timed(h2d),
        "contiguous_d2h_gbps": timed(lambda: flat_host.copy_(flat_dev, non_blocking=True)),
        "contiguous_h2d_gbps": timed(lambda: flat_dev.copy_(flat_host, non_blocking=True)),
    }
    d2h()
    torch.cuda.synchronize()
    assert all(torch.equal(host[i].to(dev), cache[b]) for i, b in enumerate(picks)), "byte-exact"
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    facts = environment()
    import torch

    facts |= {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps({"environment": facts, "results": []}))
        sys.exit(3)
    facts["device"] = torch.cuda.get_device_name(0)
    results = []
    for size in SIZES:
        row = measure(torch, size, a.batch, a.reps)
        results.append(row)
        print(
            f"{size >> 10:>5} KiB x {a.batch}: per-block d2h {row['torch_per_block_d2h_gbps']:.1f} "
            f"h2d {row['torch_per_block_h2d_gbps']:.1f} GB/s; contiguous d2h "
            f"{row['contiguous_d2h_gbps']:.1f} h2d {row['contiguous_h2d_gbps']:.1f} GB/s",
            file=sys.stderr,
        )
    print(json.dumps({"environment": facts, "results": results}))


if __name__ == "__main__":
    main()

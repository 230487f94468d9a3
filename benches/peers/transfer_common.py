"""Workload, timing, verification and reporting shared by the peer transfer benchmarks.

``mooncake_bench.py`` and ``nixl_bench.py`` measure the same thing: one process (the
*initiator*) moves blocks between its registered host memory and another process's (the
*target*) over loopback, writing (push) into the target and reading (pull) from it. This
module holds everything that does not depend on the transfer library:

* the matrix: block sizes 64 KiB, 256 KiB, 1 MiB, 4 MiB x batches of 1, 16 and 256 blocks x
  write/read;
* the memory: each process owns one pool (a numpy ``uint8`` array, registered once with the
  library), large enough for the biggest batch (1 GiB by default). A configuration moves
  ``batch`` blocks between slots chosen at random on each side, so that neither side's blocks
  are contiguous and no library can merge a batch into one large copy;
* the control channel: a ``multiprocessing`` pipe between the driver's two children, used only
  outside the timed loop to prepare the target's slots (fill or zero them) and to fetch their
  checksums;
* verification: before a configuration the source slots get a fresh pattern (random bytes
  stamped with the configuration's tag and the slot) and the destination slots are zeroed;
  after the timed loop a sample of the batch's blocks (8 by default, all with
  ``--verify-all``) is compared by CRC-32 between the two sides;
* timing: each timed iteration is one whole batch, from the call that submits it to the
  moment the initiator sees it complete. Bandwidth is the batch's bytes over the median batch
  time (GB/s, 10^9 bytes/s); the per-block latency is the median batch time divided by the
  batch size (for a batch of 1 it is the latency of one block).

A library binding plugs in a ``Mover`` (how the initiator moves one batch) and a target-side
setup; ``run_driver`` starts the two processes, collects the results and prints them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import struct
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

KIB = 1024
MIB = 1024 * KIB
BLOCK_SIZES: tuple[int, ...] = (64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB)
BATCHES: tuple[int, ...] = (1, 16, 256)
OPS: tuple[str, ...] = ("write", "read")
PATTERN_BYTES = 4 * MIB
INITIATOR_SEED = 1
TARGET_SEED = 2

Pool = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Options:
    quick: bool
    block_sizes: tuple[int, ...]
    batches: tuple[int, ...]
    ops: tuple[str, ...]
    warmup: int
    min_iters: int
    max_iters: int
    min_time_s: float
    max_time_s: float
    sample_blocks: int
    seed: int
    timeout_s: float

    @property
    def pool_bytes(self) -> int:
        return max(b * n for b in self.block_sizes for n in self.batches)

    def configs(self) -> list[Config]:
        return [Config(op, b, n) for b in self.block_sizes for n in self.batches for op in self.ops]


@dataclass(frozen=True)
class Config:
    op: str  # "write": initiator -> target; "read": target -> initiator
    block: int
    batch: int

    def label(self) -> str:
        return f"{self.op} {fmt_size(self.block)} x {self.batch}"


@dataclass
class Result:
    transport: str
    op: str
    block_bytes: int
    batch: int
    iters: int
    batch_bytes: int
    gbps: float | None
    gbps_mean: float | None
    batch_us_p50: float | None
    batch_us_min: float | None
    batch_us_max: float | None
    per_block_us: float | None
    prep_ms: float | None
    verified: bool
    checked_blocks: int
    error: str | None = None

    @classmethod
    def failed(cls, transport: str, cfg: Config, error: str) -> Result:
        return cls(
            transport=transport,
            op=cfg.op,
            block_bytes=cfg.block,
            batch=cfg.batch,
            iters=0,
            batch_bytes=cfg.block * cfg.batch,
            gbps=None,
            gbps_mean=None,
            batch_us_p50=None,
            batch_us_min=None,
            batch_us_max=None,
            per_block_us=None,
            prep_ms=None,
            verified=False,
            checked_blocks=0,
            error=error,
        )


class Batch(Protocol):
    """One prepared batch: ``run`` moves it once and returns when it is complete."""

    def run(self) -> None: ...

    def close(self) -> None: ...


class Mover(Protocol):
    """The initiator side of a library: prepares batches between the two pools."""

    def prepare(self, op: str, block: int, local_addrs: list[int], remote_addrs: list[int]) -> Batch: ...


@dataclass
class TargetInfo:
    """What the target tells the initiator once its pool is registered."""

    pool_addr: int
    extra: dict[str, Any] = field(default_factory=dict)


# --- sizes and arguments ---------------------------------------------------------------------------


def fmt_size(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    if n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n} B"


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KIB, "M": MIB, "G": 1024 * MIB}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" else t
    return int(digits) * mult


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timed loops, same matrix")
    parser.add_argument(
        "--block-sizes", default="64K,256K,1M,4M", help="comma-separated block sizes (default 64K,256K,1M,4M)"
    )
    parser.add_argument(
        "--batches", default="1,16,256", help="comma-separated batch sizes (default 1,16,256)"
    )
    parser.add_argument("--ops", default="write,read", help="write, read or both (default write,read)")
    parser.add_argument("--warmup", type=int, help="untimed batches per configuration (default 2, quick 1)")
    parser.add_argument("--min-iters", type=int, help="timed batches at least (default 5, quick 3)")
    parser.add_argument("--max-iters", type=int, help="timed batches at most (default 5000, quick 500)")
    parser.add_argument(
        "--min-time", type=float, help="seconds a configuration is timed at least (default 1.0, quick 0.2)"
    )
    parser.add_argument(
        "--max-time", type=float, help="seconds after which a configuration stops (default 5, quick 2)"
    )
    parser.add_argument("--verify-all", action="store_true", help="checksum every block, not a sample of 8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the slot choice")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is abandoned")


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    quick: bool = args.quick
    try:
        block_sizes = tuple(parse_size(s) for s in args.block_sizes.split(",") if s.strip())
        batches = tuple(int(s) for s in args.batches.split(",") if s.strip())
    except ValueError as e:
        parser.error(f"bad size list: {e}")
    ops = tuple(s.strip() for s in args.ops.split(",") if s.strip())
    if not block_sizes or not batches or any(b <= 0 for b in (*block_sizes, *batches)):
        parser.error("--block-sizes and --batches need positive values")
    if not ops or any(op not in OPS for op in ops):
        parser.error("--ops takes write, read or write,read")
    if any(b > PATTERN_BYTES for b in block_sizes):
        parser.error(f"blocks above {fmt_size(PATTERN_BYTES)} are not supported")
    if any(b < 16 for b in block_sizes):
        parser.error("blocks must be at least 16 bytes")

    def pick(value: Any, full: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else full)

    return Options(
        quick=quick,
        block_sizes=block_sizes,
        batches=batches,
        ops=ops,
        warmup=pick(args.warmup, 2, 1),
        min_iters=pick(args.min_iters, 5, 3),
        max_iters=pick(args.max_iters, 5000, 500),
        min_time_s=pick(args.min_time, 1.0, 0.2),
        max_time_s=pick(args.max_time, 5.0, 2.0),
        sample_blocks=1 << 30 if args.verify_all else 8,
        seed=args.seed,
        timeout_s=args.timeout,
    )


# --- memory ----------------------------------------------------------------------------------------


def alloc_pool(nbytes: int) -> Pool:
    """A page-aligned zeroed pool (numpy's own allocation is only 16/64-byte aligned)."""
    page = 4096
    raw = np.zeros(nbytes + page, dtype=np.uint8)
    start = (-raw.ctypes.data) % page
    pool: Pool = raw[start : start + nbytes]
    return pool


def pool_addr(pool: Pool) -> int:
    return int(pool.ctypes.data)


def make_pattern(seed: int) -> Pool:
    pattern: Pool = np.random.default_rng(seed).integers(0, 256, PATTERN_BYTES, dtype=np.uint8)
    return pattern


def fill_slots(pool: Pool, pattern: Pool, block: int, slots: Sequence[int], tag: int) -> None:
    for slot in slots:
        off = slot * block
        pool[off : off + block] = pattern[:block]
        pool[off : off + 16] = np.frombuffer(struct.pack("<QQ", tag, slot), dtype=np.uint8)


def zero_slots(pool: Pool, block: int, slots: Sequence[int]) -> None:
    for slot in slots:
        pool[slot * block : (slot + 1) * block] = 0


def crc_slots(pool: Pool, block: int, slots: Sequence[int]) -> list[int]:
    return [zlib.crc32(pool[s * block : (s + 1) * block].data) for s in slots]


def sample_indices(batch: int, limit: int) -> list[int]:
    """Up to ``limit`` positions in a batch: the first, the last and evenly spaced ones between."""
    if batch <= limit:
        return list(range(batch))
    return sorted({round(i * (batch - 1) / (limit - 1)) for i in range(limit)})


def choose_slots(opts: Options, cfg: Config) -> tuple[list[int], list[int]]:
    nslots = opts.pool_bytes // cfg.block
    rng = random.Random(f"{opts.seed}:{cfg.block}:{cfg.batch}:{cfg.op}")
    return rng.sample(range(nslots), cfg.batch), rng.sample(range(nslots), cfg.batch)


# --- target process --------------------------------------------------------------------------------


def enter_child(env: dict[str, str]) -> None:
    """First thing in either child: its environment, and stdout pointed at stderr (at the file
    descriptor, so that C++ logging goes there too), so that only the driver writes to stdout."""
    os.environ.update(env)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def serve_target(conn: Connection, pool: Pool) -> None:
    """Answers the initiator's control requests until it says stop. Transfers themselves are
    served by the library's own threads while this waits on the pipe."""
    pattern = make_pattern(TARGET_SEED)
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "fill":
            _, block, slots, tag = msg
            fill_slots(pool, pattern, block, slots, tag)
            conn.send(("ok",))
        elif kind == "zero":
            _, block, slots = msg
            zero_slots(pool, block, slots)
            conn.send(("ok",))
        elif kind == "crc":
            _, block, slots = msg
            conn.send(("ok", crc_slots(pool, block, slots)))
        elif kind == "stop":
            return
        else:
            conn.send(("error", f"unknown request {kind!r}"))


def target_main(
    conn: Connection,
    pool_bytes: int,
    env: dict[str, str],
    setup: Callable[[Pool], tuple[TargetInfo, Callable[[], None]]],
) -> None:
    """Body of the target process: ``setup`` registers the pool with the library and returns
    what the initiator needs plus a teardown."""
    enter_child(env)
    try:
        pool = alloc_pool(pool_bytes)
        info, teardown = setup(pool)
        conn.send(("ready", info))
        serve_target(conn, pool)
        teardown()
        conn.send(("bye",))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


# --- initiator process -----------------------------------------------------------------------------


def ask(conn: Connection, *msg: Any) -> Any:
    conn.send(msg)
    reply = conn.recv()
    if reply[0] != "ok":
        raise RuntimeError(f"target: {reply[1] if len(reply) > 1 else reply}")
    return reply[1] if len(reply) > 1 else None


def run_config(
    opts: Options,
    cfg: Config,
    tag: int,
    transport: str,
    mover: Mover,
    pool: Pool,
    pattern: Pool,
    local_base: int,
    remote_base: int,
    target: Connection,
) -> Result:
    local_slots, remote_slots = choose_slots(opts, cfg)
    block = cfg.block
    # Source gets a fresh pattern, destination zeros: a block that did not move fails the check.
    if cfg.op == "write":
        fill_slots(pool, pattern, block, local_slots, tag)
        ask(target, "zero", block, remote_slots)
    else:
        zero_slots(pool, block, local_slots)
        ask(target, "fill", block, remote_slots, tag)

    t0 = time.perf_counter()
    batch = mover.prepare(
        cfg.op,
        block,
        [local_base + s * block for s in local_slots],
        [remote_base + s * block for s in remote_slots],
    )
    prep_ms = (time.perf_counter() - t0) * 1e3
    samples_ns: list[int] = []
    try:
        for _ in range(opts.warmup):
            batch.run()
        started = time.perf_counter_ns()
        while True:
            t = time.perf_counter_ns()
            batch.run()
            now = time.perf_counter_ns()
            samples_ns.append(now - t)
            elapsed = (now - started) / 1e9
            n = len(samples_ns)
            if n >= opts.max_iters or elapsed >= opts.max_time_s:
                break
            if n >= opts.min_iters and elapsed >= opts.min_time_s:
                break
    finally:
        batch.close()

    picks = sample_indices(cfg.batch, opts.sample_blocks)
    local_crcs = crc_slots(pool, block, [local_slots[i] for i in picks])
    remote_crcs = ask(target, "crc", block, [remote_slots[i] for i in picks])
    zero_crc = zlib.crc32(bytes(block))
    verified = local_crcs == remote_crcs and zero_crc not in local_crcs

    us = sorted(s / 1e3 for s in samples_ns)
    p50 = statistics.median(us)
    batch_bytes = block * cfg.batch
    return Result(
        transport=transport,
        op=cfg.op,
        block_bytes=block,
        batch=cfg.batch,
        iters=len(us),
        batch_bytes=batch_bytes,
        gbps=round(batch_bytes / (p50 * 1e3), 3),
        gbps_mean=round(batch_bytes * len(us) / (sum(us) * 1e3), 3),
        batch_us_p50=round(p50, 1),
        batch_us_min=round(us[0], 1),
        batch_us_max=round(us[-1], 1),
        per_block_us=round(p50 / cfg.batch, 2),
        prep_ms=round(prep_ms, 2),
        verified=verified,
        checked_blocks=len(picks),
        error=None if verified else "checksum mismatch between the two sides",
    )


def initiator_main(
    conn: Connection,
    target: Connection,
    opts: Options,
    transport: str,
    env: dict[str, str],
    setup: Callable[[Pool, TargetInfo], tuple[Mover, Callable[[], None]]],
) -> None:
    """Body of the initiator process: waits for the target, sets up the library through
    ``setup`` (which registers the pool and connects to the target), runs every configuration
    and sends the results to the driver."""
    enter_child(env)
    try:
        reply = target.recv()
        if reply[0] != "ready":
            conn.send(("error", f"target failed to start:\n{reply[1]}"))
            return
        info: TargetInfo = reply[1]
        pool = alloc_pool(opts.pool_bytes)
        pattern = make_pattern(INITIATOR_SEED)
        t0 = time.perf_counter()
        mover, teardown = setup(pool, info)
        setup_s = time.perf_counter() - t0
        results: list[Result] = []
        for tag, cfg in enumerate(opts.configs(), start=1):
            try:
                r = run_config(
                    opts, cfg, tag, transport, mover, pool, pattern, pool_addr(pool), info.pool_addr, target
                )
            except Exception as e:
                r = Result.failed(transport, cfg, f"{type(e).__name__}: {e}")
            results.append(r)
            print(f"  {transport}: {cfg.label():<22} {describe(r)}", file=sys.stderr, flush=True)
        target.send(("stop",))
        bye = target.recv()
        teardown()
        conn.send(("results", [asdict(r) for r in results], round(setup_s, 3), bye[0] == "bye"))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def describe(r: Result) -> str:
    if r.error and not r.iters:
        return f"FAILED: {r.error}"
    check = "ok" if r.verified else "MISMATCH"
    return (
        f"{r.gbps:7.3f} GB/s  {r.per_block_us:9.1f} us/block  batch p50 {r.batch_us_p50:10.1f} us  "
        f"({r.iters} iters, check {check} on {r.checked_blocks})"
    )


# --- driver ----------------------------------------------------------------------------------------


@dataclass
class TransportRun:
    transport: str
    results: list[dict[str, Any]]
    setup_s: float | None
    error: str | None
    exit_codes: tuple[int | None, int | None]


def run_pair(
    opts: Options,
    transport: str,
    env: dict[str, str],
    target_setup: Callable[[Pool], tuple[TargetInfo, Callable[[], None]]],
    initiator_setup: Callable[[Pool, TargetInfo], tuple[Mover, Callable[[], None]]],
) -> TransportRun:
    """Starts a target and an initiator process (spawned, so each initializes the library on its
    own) and waits for the initiator's results."""
    ctx = mp.get_context("spawn")
    drv_end, init_end = ctx.Pipe()
    tgt_end, init_tgt_end = ctx.Pipe()
    tgt = ctx.Process(
        target=target_main, args=(tgt_end, opts.pool_bytes, env, target_setup), name="target", daemon=True
    )
    ini = ctx.Process(
        target=initiator_main,
        args=(init_end, init_tgt_end, opts, transport, env, initiator_setup),
        name="initiator",
        daemon=True,
    )
    tgt.start()
    ini.start()
    error: str | None = None
    results: list[dict[str, Any]] = []
    setup_s: float | None = None
    try:
        if drv_end.poll(opts.timeout_s):
            msg = drv_end.recv()
            if msg[0] == "results":
                results, setup_s = msg[1], msg[2]
            else:
                error = msg[1]
        else:
            error = f"no result within {opts.timeout_s:.0f} s"
    except EOFError:
        error = "the initiator process died before reporting (see its output above)"
    for p in (ini, tgt):
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    return TransportRun(transport, results, setup_s, error, (tgt.exitcode, ini.exitcode))


def installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def report(
    system: str,
    package: str,
    opts: Options,
    runs: Sequence[TransportRun],
    notes: str,
    env: dict[str, dict[str, str]],
    elapsed_s: float,
) -> int:
    """Prints the JSON line on stdout and the summary on stderr; returns the exit status."""
    ok = bool(runs) and all(
        r.error is None and r.results and all(x["verified"] for x in r.results) for r in runs
    )
    record = {
        "system": system,
        "version": installed_version(package),
        "processes": 2,
        "quick": opts.quick,
        "pool_bytes": opts.pool_bytes,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "elapsed_s": round(elapsed_s, 1),
        "ok": ok,
        "transports": {
            r.transport: {
                "settings": env.get(r.transport, {}),
                "setup_s": r.setup_s,
                "error": r.error,
                "exit_codes": {"target": r.exit_codes[0], "initiator": r.exit_codes[1]},
            }
            for r in runs
        },
        "results": [x for r in runs for x in r.results],
        "notes": notes,
    }
    print(json.dumps(record), flush=True)

    err = sys.stderr
    print(
        f"{system} {record['version']} ({'quick' if opts.quick else 'full'} run, {elapsed_s:.1f} s, "
        f"2 processes over loopback, load {record['loadavg_1m']} on {record['cpus']} CPUs)",
        file=err,
    )
    for r in runs:
        env_text = " ".join(f"{k}={v}" for k, v in env.get(r.transport, {}).items())
        print(f"  transport {r.transport} ({env_text or 'defaults'})", file=err)
        if r.error:
            print(f"    ERROR: {r.error.strip()}", file=err)
        if any(c not in (0, None) for c in r.exit_codes):
            print(f"    exit codes: target {r.exit_codes[0]}, initiator {r.exit_codes[1]}", file=err)
        if not r.results:
            continue
        print(
            f"    {'op':<6}{'block':>8}{'batch':>7}{'GB/s':>9}{'us/block':>11}{'batch p50 us':>14}"
            f"{'iters':>7}  check",
            file=err,
        )
        for x in r.results:
            if not x["iters"]:
                head = f"    {x['op']:<6}{fmt_size(x['block_bytes']):>8}{x['batch']:>7}"
                print(f"{head}  FAILED: {x['error']}", file=err)
                continue
            check = "ok" if x["verified"] else (x["error"] or "failed")
            print(
                f"    {x['op']:<6}{fmt_size(x['block_bytes']):>8}{x['batch']:>7}{x['gbps']:>9.3f}"
                f"{x['per_block_us']:>11.1f}{x['batch_us_p50']:>14.1f}{x['iters']:>7}  {check}",
                file=err,
            )
    return 0 if ok else 1

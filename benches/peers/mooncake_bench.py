"""Benchmark Mooncake's Transfer Engine moving KV-sized blocks between two processes over loopback.

Mooncake (``mooncake-transfer-engine-non-cuda``, installed by ``benches/peers/setup-mooncake.sh``
into ``target/venv-mooncake``; run this file with that venv's python) exposes its Transfer
Engine to Python as ``mooncake.engine.TransferEngine``. The calls used:

* ``TransferEngine().initialize(local_hostname, metadata_server, protocol, device_name)`` with
  ``"127.0.0.1"``, ``"P2PHANDSHAKE"``, ``"tcp"``, ``""``. ``P2PHANDSHAKE`` is Mooncake's
  peer-to-peer metadata mode: no etcd, Redis or HTTP metadata server is needed; each engine
  listens on an RPC port of its own (``get_rpc_port()``) and a peer is named by the session id
  ``"127.0.0.1:<rpc port>"``, whose segment descriptor (registered buffers, TCP data port) is
  fetched from that port on first use. With no RDMA device the engine installs its TCP
  transport whatever protocol is asked; this wheel's classic backend has no shared-memory
  transport, so TCP over loopback is the only path measured.
* ``register_memory(addr, length)`` once per process for its whole pool (a numpy array).
* ``batch_transfer_sync_write(session, local_addrs, remote_addrs, lengths)`` and
  ``batch_transfer_sync_read(...)``: one call per batch, returning 0 when every block of the
  batch has completed. A batch of 1 goes through the same call.

Process model: the driver spawns two processes, a target (registers its pool, publishes its
session id and pool address, then only answers control requests while the engine's threads
serve the transfers) and an initiator (registers its pool and issues every transfer). The
workload, verification, timing and output are those of ``transfer_common.py``: block sizes
64 KiB-4 MiB x batches of 1, 16, 256, write (push) and read (pull), blocks at random slots on
both sides, a checksummed sample of every batch.

Environment: ``MC_LOG_LEVEL`` defaults to ``ERROR`` here (Mooncake's glog otherwise logs every
connection at INFO). Two lines remain at start-up and are harmless: "No RDMA devices found"
and "Local segment descriptor not found". The engines listen on wildcard addresses (the RPC
and TCP data ports are picked by Mooncake); all traffic goes to 127.0.0.1, the address in the
session ids.

Output: one JSON line on stdout, a readable summary on stderr. Exit status 0 when every
configuration ran and verified, 1 when one did not, 3 when Mooncake is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from transfer_common import (
    Batch,
    Mover,
    Options,
    Pool,
    TargetInfo,
    add_common_args,
    options_from_args,
    pool_addr,
    report,
    run_pair,
)

SYSTEM = "mooncake-transfer-engine"
PACKAGE = "mooncake-transfer-engine-non-cuda"
HOST = "127.0.0.1"
METADATA = "P2PHANDSHAKE"
PROTOCOL = "tcp"
ENV_DEFAULTS = {"MC_LOG_LEVEL": "ERROR"}


def new_engine(pool: Pool) -> Any:
    """An initialized engine with ``pool`` registered."""
    from mooncake.engine import TransferEngine  # type: ignore[import-untyped]

    engine = TransferEngine()
    rc = engine.initialize(HOST, METADATA, PROTOCOL, "")
    if rc != 0:
        raise RuntimeError(f"TransferEngine.initialize({HOST!r}, {METADATA!r}, {PROTOCOL!r}) returned {rc}")
    rc = engine.register_memory(pool_addr(pool), pool.nbytes)
    if rc != 0:
        raise RuntimeError(f"register_memory of {pool.nbytes} bytes returned {rc}")
    return engine


def target_setup(pool: Pool) -> tuple[TargetInfo, Callable[[], None]]:
    engine = new_engine(pool)
    session = f"{HOST}:{engine.get_rpc_port()}"

    def teardown() -> None:
        engine.unregister_memory(pool_addr(pool))

    return TargetInfo(pool_addr(pool), {"session": session}), teardown


class MooncakeBatch:
    def __init__(
        self, call: Callable[..., int], session: str, local: list[int], remote: list[int], block: int
    ) -> None:
        self.call = call
        self.session = session
        self.local = local
        self.remote = remote
        self.lengths = [block] * len(local)

    def run(self) -> None:
        rc = self.call(self.session, self.local, self.remote, self.lengths)
        if rc != 0:
            raise RuntimeError(f"batch transfer returned {rc}")

    def close(self) -> None:
        pass


class MooncakeMover:
    def __init__(self, engine: Any, session: str) -> None:
        self.engine = engine
        self.session = session

    def prepare(self, op: str, block: int, local_addrs: list[int], remote_addrs: list[int]) -> Batch:
        call = (
            self.engine.batch_transfer_sync_write if op == "write" else self.engine.batch_transfer_sync_read
        )
        return MooncakeBatch(call, self.session, local_addrs, remote_addrs, block)


def initiator_setup(pool: Pool, info: TargetInfo) -> tuple[Mover, Callable[[], None]]:
    engine = new_engine(pool)
    session: str = info.extra["session"]

    def teardown() -> None:
        engine.unregister_memory(pool_addr(pool))

    return MooncakeMover(engine, session), teardown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    opts: Options = options_from_args(parser, args)

    if importlib.util.find_spec("mooncake") is None:
        print(
            f"{SYSTEM}: mooncake is not installed here; run benches/peers/setup-mooncake.sh", file=sys.stderr
        )
        return 3

    env = {k: os.environ.get(k, v) for k, v in ENV_DEFAULTS.items()}
    started = time.perf_counter()
    print(
        f"{SYSTEM}: {len(opts.configs())} configurations, pool {opts.pool_bytes >> 20} MiB per process",
        file=sys.stderr,
    )
    run = run_pair(opts, PROTOCOL, env, target_setup, initiator_setup)
    elapsed = time.perf_counter() - started
    notes = (
        "mooncake.engine.TransferEngine, classic backend, TCP transport, P2PHANDSHAKE metadata "
        "(no metadata server); target and initiator in two processes, one register_memory of the "
        "whole pool each; one batch_transfer_sync_write/_read call per timed batch (submit + wait); "
        "blocks at random slots on both sides; GB/s = batch bytes / median batch time (10^9 B/s); "
        "us/block = median batch time / batch; a sample of each batch checked by CRC-32 on both sides"
    )
    return report(SYSTEM, PACKAGE, opts, [run], notes, {PROTOCOL: env}, elapsed)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark NVIDIA's NIXL (UCX backend) moving KV-sized blocks between two processes over loopback.

NIXL (``nixl-cu12``, installed by ``benches/peers/setup-nixl.sh`` into ``target/venv-nixl``;
run this file with that venv's python) ships UCX and its UCX plugin inside the wheel. Its
Python API is ``nixl_agent`` (module ``nixl_cu12``; the ``nixl`` meta-package re-exports it).
No CUDA library is needed: importing, creating agents and moving host (``DRAM``) memory work
on a machine without a GPU or a CUDA runtime, and torch is not needed either (the API only
looks for it in ``sys.modules``). The calls used:

* ``nixl_agent(name, nixl_agent_config(enable_prog_thread=..., backends=[]))`` then
  ``create_backend("UCX", params)``: one agent per process. The target has NIXL's progress
  thread (it must progress UCX for the TCP transport to serve the initiator's puts and gets);
  the initiator has none by default (``--initiator-progress-thread`` adds it), since its own
  polling of the request progresses its worker.
* The progress thread's poll timeout: ``nixl_agent`` always builds its agent with
  ``pthrDelay=0``, which makes the progress thread call ``poll()`` with a zero timeout, a busy
  loop that keeps one core at 100 % for as long as the agent lives. On a 2-core machine the
  target's spinning thread competes with the initiator's polling and everything else, and TCP
  transfers then complete only on scheduler ticks (every batch of 1 block took 8-12 ms on a
  2-core machine, whatever its size). By default (``--progress-delay-us 1000``) the benchmark therefore builds
  the binding's agent itself (``_bindings.nixlAgentConfig`` with ``pthrDelay=1000``) and puts
  it under the ``nixl_agent`` wrapper before the backend is created: the thread then sleeps in
  ``poll()`` on the UCX worker's event fd and wakes when data arrives (or after 1 ms).
  ``--progress-delay-us 0`` measures the Python API exactly as it ships.
* ``register_memory([(addr, length, 0, "")], "DRAM")`` once per process for its whole pool.
* ``get_agent_metadata()`` on the target and ``add_remote_agent(metadata)`` +
  ``make_connection(name)`` on the initiator: the metadata goes over the benchmark's own pipe,
  so neither NIXL's listener thread nor an etcd server is used.
* ``prep_xfer_dlist("NIXL_INIT_AGENT", descs, "DRAM")`` and ``prep_xfer_dlist(target, descs,
  "DRAM")`` once per block size (descriptors for every slot of the pool, an Nx3 numpy array of
  address, length, device 0), then per configuration ``make_prepped_xfer("WRITE" | "READ",
  local, local_indices, remote, remote_indices)``. Each timed batch reposts that handle with
  ``transfer(handle)`` and polls ``check_xfer_state(handle)`` until ``"DONE"``: one NIXL
  request of ``batch`` descriptors per timed batch. The first configuration of each block size
  pays the dlist preparation (``prep_ms``), outside the timed loop.

Transports (``--transports``, default ``tcp,shm``), each in its own pair of processes:

* ``tcp``: ``UCX_TLS=tcp``, ``UCX_NET_DEVICES=lo``. UCX emulates the one-sided put/get over
  its TCP transport (``rma_am(tcp/lo)``, zero-copy sends); the target's progress thread serves
  them.
* ``shm``: ``UCX_TLS=sm`` (posix, sysv, cma) with the UCX backend's
  ``ucx_error_handling_mode=none``. NIXL's default ``peer`` mode needs a transport with peer
  failure detection, which none of the shared-memory transports has: with ``UCX_TLS=sm``
  alone, creating the backend fails ("no active messages transport ... no peer failure
  handler", ``NIXL_ERR_BACKEND``). With ``none``, UCX does puts and gets as one zero-copy
  ``process_vm_writev``/``readv`` (``cma/memory``); the AM lanes use sysv shared memory.

Set for both transports unless already set: ``NIXL_LOG_LEVEL=WARN`` (NIXL logs each agent
and backend creation at INFO, on stdout) and ``UCX_MODULES=^ib``: the wheel's InfiniBand
module pulls in a bundled libnl whose destructor crashes with SIGSEGV at process exit
(``rtnl_tc_unregister``) on a host without RDMA devices, after the work is done. Other
``UCX_*`` variables in the environment pass through (``UCX_PROTO_INFO=y`` prints the protocol
UCX picked for each operation and size).

Process model: the driver spawns a target (registers its pool, hands over its agent metadata
and pool address, then only answers control requests while its progress thread serves the
transfers) and an initiator (issues every transfer). Workload, verification, timing and output
are those of ``transfer_common.py``.

Output: one JSON line on stdout, a readable summary on stderr. Exit status 0 when every
configuration ran and verified, 1 when one did not, 3 when NIXL is not installed.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from transfer_common import (
    Batch,
    Mover,
    Options,
    Pool,
    TargetInfo,
    TransportRun,
    add_common_args,
    options_from_args,
    pool_addr,
    report,
    run_pair,
)

SYSTEM = "nixl"
PACKAGE = "nixl-cu12"
BACKEND = "UCX"
TARGET_NAME = "target"
INITIATOR_NAME = "initiator"

# Per transport: the UCX environment and the UCX backend's parameters.
TRANSPORTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "tcp": ({"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}, {}),
    "shm": ({"UCX_TLS": "sm", "UCX_NET_DEVICES": "lo"}, {"ucx_error_handling_mode": "none"}),
}
COMMON_ENV = {"UCX_MODULES": "^ib", "NIXL_LOG_LEVEL": "WARN"}


def import_nixl() -> ModuleType:
    """The wheel's own module first (installed alone, without the meta-package), then ``nixl``."""
    for name in ("nixl_cu12", "nixl_cu13", "nixl"):
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    raise ImportError("no NIXL module (nixl_cu12, nixl_cu13 or nixl) is installed")


@dataclass(frozen=True)
class AgentSettings:
    params: dict[str, str]  # UCX backend parameters
    initiator_progress_thread: bool
    progress_delay_us: int  # 0: the Python API's own agent configuration


def new_agent(name: str, settings: AgentSettings, progress_thread: bool, pool: Pool) -> tuple[Any, Any]:
    """An agent with the UCX backend and ``pool`` registered; returns (agent, registration)."""
    nixl = import_nixl()
    config = nixl.nixl_agent_config(
        enable_prog_thread=progress_thread, enable_listen_thread=False, backends=[]
    )
    agent = nixl.nixl_agent(name, config)
    if progress_thread and settings.progress_delay_us > 0:
        # nixl_agent always sets pthrDelay=0: the progress thread polls its worker with a zero
        # timeout, a busy loop on one core. With a delay it sleeps in poll() on the worker's
        # event fd (waking at least every max(1 ms, delay)). The binding's agent is swapped
        # before any backend exists, so the wrapper's methods all go to the new one.
        binding = sys.modules[f"{nixl.__name__}._bindings"]
        raw = binding.nixlAgentConfig()
        raw.useProgThread = True
        raw.useListenThread = False
        raw.syncMode = binding.NIXL_THREAD_SYNC_NONE
        raw.pthrDelay = settings.progress_delay_us
        raw.captureTelemetry = False
        agent.agent = binding.nixlAgent(name, raw)
    agent.create_backend(BACKEND, settings.params)
    reg = agent.register_memory([(pool_addr(pool), pool.nbytes, 0, "")], "DRAM")
    return agent, reg


def target_setup(settings: AgentSettings, pool: Pool) -> tuple[TargetInfo, Callable[[], None]]:
    agent, reg = new_agent(TARGET_NAME, settings, True, pool)

    def teardown() -> None:
        agent.deregister_memory(reg)

    return TargetInfo(pool_addr(pool), {"metadata": agent.get_agent_metadata()}), teardown


class NixlBatch:
    def __init__(self, agent: Any, handle: Any) -> None:
        self.agent = agent
        self.handle = handle

    def run(self) -> None:
        state = self.agent.transfer(self.handle)
        while state == "PROC":
            state = self.agent.check_xfer_state(self.handle)
        if state != "DONE":
            raise RuntimeError(f"transfer ended in state {state}")

    def close(self) -> None:
        self.handle.release()


class NixlMover:
    def __init__(self, agent: Any, remote: str, local_base: int, remote_base: int, pool_bytes: int) -> None:
        self.agent = agent
        self.remote = remote
        self.local_base = local_base
        self.remote_base = remote_base
        self.pool_bytes = pool_bytes
        self.dlists: dict[int, tuple[Any, Any]] = {}

    def _dlists(self, block: int) -> tuple[Any, Any]:
        """Prepared descriptor lists covering every slot of both pools, once per block size."""
        if block not in self.dlists:
            nslots = self.pool_bytes // block
            offsets = np.arange(nslots, dtype=np.uint64) * np.uint64(block)

            def descs(base: int) -> Any:
                return np.stack(
                    [
                        offsets + np.uint64(base),
                        np.full(nslots, block, np.uint64),
                        np.zeros(nslots, np.uint64),
                    ],
                    axis=1,
                )

            local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs(self.local_base), "DRAM")
            remote = self.agent.prep_xfer_dlist(self.remote, descs(self.remote_base), "DRAM")
            self.dlists[block] = (local, remote)
        return self.dlists[block]

    def prepare(self, op: str, block: int, local_addrs: list[int], remote_addrs: list[int]) -> Batch:
        local, remote = self._dlists(block)
        local_idx = [(a - self.local_base) // block for a in local_addrs]
        remote_idx = [(a - self.remote_base) // block for a in remote_addrs]
        handle = self.agent.make_prepped_xfer(op.upper(), local, local_idx, remote, remote_idx)
        return NixlBatch(self.agent, handle)


def initiator_setup(
    settings: AgentSettings, pool: Pool, info: TargetInfo
) -> tuple[Mover, Callable[[], None]]:
    agent, reg = new_agent(INITIATOR_NAME, settings, settings.initiator_progress_thread, pool)
    remote = agent.add_remote_agent(info.extra["metadata"])
    remote_name = remote.decode() if isinstance(remote, bytes) else str(remote)
    agent.make_connection(remote_name)
    mover = NixlMover(agent, remote_name, pool_addr(pool), info.pool_addr, pool.nbytes)

    def teardown() -> None:
        for local, remote_list in mover.dlists.values():
            local.release()
            remote_list.release()
        agent.remove_remote_agent(remote_name)
        agent.deregister_memory(reg)

    return mover, teardown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_common_args(parser)
    parser.add_argument(
        "--transports",
        default="tcp,shm",
        help=f"comma-separated, of {', '.join(TRANSPORTS)} (default tcp,shm)",
    )
    parser.add_argument(
        "--initiator-progress-thread",
        action="store_true",
        help="give the initiator NIXL's progress thread too (default: only the target has one)",
    )
    parser.add_argument(
        "--progress-delay-us",
        type=int,
        default=1000,
        help="progress thread poll timeout in us (default 1000, event-driven); 0 keeps the Python "
        "API's own setting, a progress thread that busy-polls one core",
    )
    args = parser.parse_args(argv)
    opts: Options = options_from_args(parser, args)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not transports or any(t not in TRANSPORTS for t in transports):
        parser.error(f"--transports takes {', '.join(TRANSPORTS)}")

    if not any(importlib.util.find_spec(m) for m in ("nixl_cu12", "nixl_cu13", "nixl")):
        print(f"{SYSTEM}: NIXL is not installed here; run benches/peers/setup-nixl.sh", file=sys.stderr)
        return 3

    started = time.perf_counter()
    print(
        f"{SYSTEM}: {len(opts.configs())} configurations x {len(transports)} transports, "
        f"pool {opts.pool_bytes >> 20} MiB per process",
        file=sys.stderr,
    )
    runs: list[TransportRun] = []
    envs: dict[str, dict[str, str]] = {}
    for transport in transports:
        ucx_env, params = TRANSPORTS[transport]
        env = {k: os.environ.get(k, v) for k, v in COMMON_ENV.items()} | ucx_env
        settings = AgentSettings(params, args.initiator_progress_thread, args.progress_delay_us)
        envs[transport] = (
            env
            | {f"backend:{k}": v for k, v in params.items()}
            | {
                "progress_thread": "target and initiator" if settings.initiator_progress_thread else "target",
                "progress_delay_us": str(settings.progress_delay_us),
            }
        )
        # Children are spawned: they start with this process's environment, updated with env.
        runs.append(
            run_pair(
                opts,
                transport,
                env,
                functools.partial(target_setup, settings),
                functools.partial(initiator_setup, settings),
            )
        )
    elapsed = time.perf_counter() - started
    notes = (
        "nixl_agent with the UCX backend, one agent per process (target with NIXL's progress thread, "
        f"poll delay {args.progress_delay_us} us, 0 = the API's busy-polling thread; initiator "
        f"{'with' if args.initiator_progress_thread else 'without'} one), metadata exchanged out of "
        "band (get_agent_metadata/add_remote_agent), one "
        "register_memory of the whole pool each; per configuration one make_prepped_xfer over dlists "
        "prepared once per block size, reposted with transfer() and polled with check_xfer_state() "
        "until DONE for each timed batch; blocks at random slots on both sides (no descriptor "
        "merging); GB/s = batch bytes / median batch time (10^9 B/s); us/block = median batch time / "
        "batch; a sample of each batch checked by CRC-32 on both sides"
    )
    return report(SYSTEM, PACKAGE, opts, runs, notes, envs, elapsed)


if __name__ == "__main__":
    sys.exit(main())

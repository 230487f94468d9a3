#!/usr/bin/env bash
# Creates target/venv-nixl with NVIDIA's NIXL (the nixl-cu12 wheel, which bundles UCX and
# NIXL's UCX plugin), plus numpy for the buffers that benches/peers/nixl_bench.py registers
# and moves over UCX's TCP/shared-memory transports.
#
# nixl-cu12 declares torch as a dependency, but its Python API imports torch only when the
# caller already has (it checks sys.modules): it is installed here with --no-deps, numpy
# alone beside it, which keeps several GB of torch and CUDA wheels out of the venv. The
# meta-package "nixl" is not used: it requires both nixl-cu12 and nixl-cu13.
#
# Idempotent: the venv is rebuilt only when the pinned requirement changes.
# Exit status: 0 installed (or already installed), 3 could not install (reason on stderr).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

# The wheel is manylinux_2_28 and bundles UCX and its plugins: an older glibc or a missing
# system library shows up in the check, where creating an agent loads the UCX plugin and UCX.
# UCX_MODULES=^ib: the bundled InfiniBand module's libnl crashes at process exit on a host
# without RDMA devices (nixl_bench.py sets the same).
export UCX_MODULES=^ib UCX_TLS=tcp UCX_NET_DEVICES=lo
check='
import nixl_cu12 as nixl
agent = nixl.nixl_agent("setup-check", nixl.nixl_agent_config(backends=["UCX"]))
assert "UCX" in agent.backends, agent.get_plugin_list()
'
pinned_venv target/venv-nixl "nixl-cu12==1.5.1 numpy==2.2.6" \
  "creating a NIXL agent with the UCX backend" "$check" --no-deps

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

KEY="nixl-cu12==1.5.1 numpy==2.2.6"
venv=target/venv-nixl
stamp=$venv/.installed
export PIP_NO_CACHE_DIR=1

fail() {
    echo "setup-nixl.sh: $KEY did not install: $*" >&2
    exit 3
}

if [ "$(cat "$stamp" 2>/dev/null)" != "$KEY" ]; then
    command -v python3 >/dev/null || fail "python3 not found"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || fail "needs Python >= 3.10, found $(python3 --version 2>&1)"
    [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || [ "$(uname -s)-$(uname -m)" = "Linux-aarch64" ] \
        || fail "wheels exist only for Linux x86_64/aarch64, this is $(uname -s)-$(uname -m)"
    rm -rf "$venv"
    mkdir -p target
    python3 -m venv "$venv" || fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    # shellcheck disable=SC2086 # KEY is a list of requirements
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps $KEY >"$log" 2>&1; then
        cat "$log" >&2
        rm -rf "$venv"
        fail "pip install failed (output above)"
    fi
    # The wheel is manylinux_2_28 and bundles UCX and its plugins: an older glibc or a
    # missing system library shows up here. Creating an agent loads the UCX plugin and UCX.
    # UCX_MODULES=^ib: the bundled InfiniBand module's libnl crashes at process exit on a
    # host without RDMA devices (nixl_bench.py sets the same).
    check='
import nixl_cu12 as nixl
agent = nixl.nixl_agent("setup-check", nixl.nixl_agent_config(backends=["UCX"]))
assert "UCX" in agent.backends, agent.get_plugin_list()
'
    if ! UCX_MODULES=^ib UCX_TLS=tcp UCX_NET_DEVICES=lo "$venv/bin/python" -c "$check" >"$log" 2>&1; then
        cat "$log" >&2
        rm -rf "$venv"
        fail "installed, but creating a NIXL agent with the UCX backend failed (output above)"
    fi
    echo "$KEY" >"$stamp"
fi
echo "setup-nixl.sh: $KEY ready in $venv" >&2

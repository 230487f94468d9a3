#!/usr/bin/env bash
# Creates target/venv-mooncake with Mooncake's Transfer Engine, the CPU-only wheel
# (mooncake-transfer-engine-non-cuda), plus numpy for the buffers that
# benches/peers/mooncake_bench.py registers and moves over its TCP transport.
#
# Idempotent: the venv is rebuilt only when the pinned requirement changes.
# Exit status: 0 installed (or already installed), 3 could not install (reason on stderr).
set -euo pipefail
cd "$(dirname "$0")/../.."

KEY="mooncake-transfer-engine-non-cuda==0.3.13.post1 numpy==2.2.6"
venv=target/venv-mooncake
stamp=$venv/.installed
export PIP_NO_CACHE_DIR=1

fail() {
    echo "setup-mooncake.sh: $KEY did not install: $*" >&2
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
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $KEY >"$log" 2>&1; then
        cat "$log" >&2
        rm -rf "$venv"
        fail "pip install failed (output above)"
    fi
    # The wheel is manylinux_2_28 and bundles its own libraries (glog, gflags, jsoncpp,
    # liburing, etcd wrapper): an older glibc or a missing system library shows up here.
    if ! "$venv/bin/python" -c 'from mooncake.engine import TransferEngine; TransferEngine()' >"$log" 2>&1; then
        cat "$log" >&2
        rm -rf "$venv"
        fail "installed, but 'from mooncake.engine import TransferEngine' failed (output above)"
    fi
    echo "$KEY" >"$stamp"
fi
echo "setup-mooncake.sh: $KEY ready in $venv" >&2

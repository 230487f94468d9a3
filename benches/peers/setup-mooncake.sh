#!/usr/bin/env bash
# Creates target/venv-mooncake with Mooncake's Transfer Engine, the CPU-only wheel
# (mooncake-transfer-engine-non-cuda), plus numpy for the buffers that
# benches/peers/mooncake_bench.py registers and moves over its TCP transport.
#
# Idempotent: the venv is rebuilt only when the pinned requirement changes.
# Exit status: 0 installed (or already installed), 3 could not install (reason on stderr).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

# The wheel is manylinux_2_28 and bundles its own libraries (glog, gflags, jsoncpp, liburing,
# etcd wrapper): an older glibc or a missing system library shows up in the check.
pinned_venv target/venv-mooncake "mooncake-transfer-engine-non-cuda==0.3.13.post1 numpy==2.2.6" \
  "'from mooncake.engine import TransferEngine'" \
  'from mooncake.engine import TransferEngine; TransferEngine()'

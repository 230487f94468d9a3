#!/usr/bin/env bash
# The main job: builds kvtier and runs the node agent, `kvagent node`, with its built-in
# defaults (no config file needed): socket /run/kvtier/agent.sock, a 4 GiB shared host arena,
# no disk tier, metrics and health on :9470. Arguments go to `kvagent node`, e.g.
#   scripts/run.sh --disk-dir /var/lib/kvtier/disk --disk-size 100GiB
#   scripts/run.sh --print-config
# Stop it with Ctrl-C (SIGINT) or SIGTERM: it drains, persists and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

cargo build --release --locked -p kvagent
exec target/release/kvagent node "$@"

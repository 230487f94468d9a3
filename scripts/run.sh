#!/usr/bin/env bash
# The main job, for now: build kvtier and run the tier benchmark (host arena vs memcpy, disk tier
# vs fio) with built-in defaults. Pass kvbench arguments to override, e.g. `scripts/run.sh tiers`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

apt_install fio
cargo build --release --locked -p kvtier-benches
if [ $# -eq 0 ]; then set -- tiers --quick; fi
exec target/release/kvbench "$@"

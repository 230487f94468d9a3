#!/usr/bin/env bash
# Creates target/venv-dynamo with NVIDIA Dynamo's Python runtime (ai-dynamo-runtime),
# whose RadixTree is the KV-router indexer that benches/dynamo/radix_bench.py measures.
#
# Idempotent: the venv is rebuilt only when the pinned requirement changes.
# Exit status: 0 installed (or already installed), 3 could not install (reason on stderr).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh

# The wheel is manylinux_2_28: an older glibc or a missing library shows up in the check.
pinned_venv target/venv-dynamo "ai-dynamo-runtime==1.6.1" \
  "'from dynamo.llm import RadixTree'" 'from dynamo.llm import RadixTree; RadixTree()'

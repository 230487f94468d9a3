#!/usr/bin/env bash
# Prints an LD_LIBRARY_PATH under which kvtier's UCX data plane runs on the UCX that the NIXL
# wheel bundles (1.23) instead of the system's (Debian 12: 1.13), to compare the two releases
# on the same machine:
#
#   LD_LIBRARY_PATH=$(benches/peers/ucx-from-nixl.sh) target/release/kvbench transfer --transports ucx
#
# The wheel's libraries carry hashed file names (libucp-<hash>.so.0.0.0); kvtier links the
# plain sonames, so target/ucx-nixl gets links under both names and to the wheel's transport
# modules. Needs target/venv-nixl (benches/peers/setup-nixl.sh). UCP's API is versioned and
# kvtier asks for the release it was built against, so a newer library serves it.
# Exit status: 0 printed, 3 no NIXL venv (reason on stderr).
set -euo pipefail
cd "$(dirname "$0")/../.."
libs=$(ls -d target/venv-nixl/lib/python3*/site-packages/nixl_cu12.libs 2>/dev/null | head -n1)
if [ -z "$libs" ]; then
  echo "no NIXL venv: run benches/peers/setup-nixl.sh first" >&2
  exit 3
fi
libs=$(realpath "$libs")
out=target/ucx-nixl
rm -rf "$out"
mkdir -p "$out"
for f in "$libs"/libuc*.so*; do
  ln -s "$f" "$out/"
done
for name in ucp ucs uct ucm; do
  ln -s "$(ls "$libs"/lib$name-*.so.0.0.0 | head -n1)" "$out/lib$name.so.0"
done
# UCX loads its transport modules (cma among them) from ucx/ beside libucs, under the file
# name ending that libucs itself was loaded by (.so.0 here, the wheel's .so.0.0.0).
mkdir -p "$out/ucx"
for f in "$libs"/ucx/*.so.0.0.0; do
  base=$(basename "$f" .so.0.0.0)
  ln -s "$f" "$out/ucx/$base.so.0.0.0"
  ln -s "$f" "$out/ucx/$base.so.0"
done
realpath "$out"

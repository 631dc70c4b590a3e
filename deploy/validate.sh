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
# Then the same for kustomizations generated under .tools/validate-overlays
# that move the daemon to another namespace (base + every component, the
# namespaced overlay, the emulator overlay), plus check_rbac.py
# --expect-namespace (every subject and object follows the namespace).
# Then the Helm chart deploy/helm/gar-restarter (helm from deploy/tools/helm.sh):
# helm lint --strict and helm template for each ci/*-values.yaml, each render
# checked like the kustomize output; values that must be refused are refused.
# Then the Grafana dashboard's queries against the daemon's metric names.
# Then check that codec::MAX_SHARDS (src/index/cache/codec.rs) is the number of
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
#   HELM          helm binary to use (default: deploy/tools/helm.sh builds the
#                 pinned one with Go >= 1.26, once, into /var/tmp/gar-restarter-tools;
#                 that first build needs the Go module proxy)
#   SKIP_HELM=1   skip the chart checks (reported as skipped, never as passed)
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
# Prometheus Operator objects (monitoring.coreos.com) have no schema in the
# validator: they are left out here and checked by check_rbac.py instead.
schema_check() {
  local report rc=0 core="${1%.yaml}.core.yaml"
  pyrun -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = [d for d in docs if not str(d.get("apiVersion", "")).startswith("monitoring.coreos.com/")]
yaml.safe_dump_all(keep, open(sys.argv[2], "w"), sort_keys=False)
' "$1" "$core" || return 1
  # run from the output dir so messages name "base.yaml", not a temp path
  report="$(cd "$(dirname "$core")" && pyrun -m kubernetes_validate --strict --quiet "${versions[@]}" "$(basename "$core")" 2>&1)" \
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

# check_render LABEL FILE [check_rbac.py args...]: schema + policy of one render.
check_render() {
  local t="$1" file="$2" report
  shift 2
  ok "$t: rendered $(grep -c '^kind:' "$file") objects"
  if schema_check "$file"; then ok "$t: schema (strict, $K8S_VERSIONS)"; else bad "$t: schema"; fi
  if report="$(cd "$out" && pyrun "$here/check_rbac.py" "$@" "$(basename "$file")" 2>&1)"; then
    ok "$t: policy (check_rbac.py${*:+ $*})"
  else
    printf '%s\n' "$report" | sed 's/^/        /'
    bad "$t: policy (check_rbac.py${*:+ $*})"
  fi
}

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
  check_render "$t" "$file"
done
# Production and the chart's default run a digest, never a tag alone.
for f in "$out/overlays-production.yaml"; do
  if grep -qE '^ +image: +"?[^ ]+@sha256:[0-9a-f]{64}"?$' "$f" && ! grep -qE '^ +image: +"?[^@ ]+"?$' "$f"; then
    ok "deploy/overlays/production: image pinned by digest"
  else
    bad "deploy/overlays/production: an image is not pinned by digest ($(grep -E '^ +image:' "$f" | tr -s ' ' | head -3))"
  fi
done

# --- kustomize in another namespace -------------------------------------------
# Generated kustomizations (kustomize loads only relative paths, so they live
# inside the repository, in the git-ignored .tools/).
gen="$root/.tools/validate-overlays"
rm -rf "$gen"
mkdir -p "$gen/ops-all" "$gen/ops-base" "$gen/ops-namespaced" "$gen/ops-emulator"
printf '%s\n' \
  '# base + every optional component, moved to namespace ops in one kustomization' \
  'namespace: ops' \
  'resources: [../../../deploy/base]' \
  'components:' \
  '  - ../../../deploy/components/admission-policy' \
  '  - ../../../deploy/components/monitoring' \
  '  - ../../../deploy/components/network-policy' >"$gen/ops-all/kustomization.yaml"
printf '%s\n' 'namespace: ops' 'resources: [../../../deploy/base]' >"$gen/ops-base/kustomization.yaml"
# The namespaced overlay the way its kustomization.yaml documents it for
# another namespace: resources point at a kustomization that moves the base.
cp deploy/overlays/namespaced/*.yaml "$gen/ops-namespaced/"
sed -i 's|^  - \.\./\.\./base$|  - ../ops-base|' "$gen/ops-namespaced/kustomization.yaml"
printf '%s\n' 'namespace: ops' 'resources: [../../../deploy/overlays/emulator]' >"$gen/ops-emulator/kustomization.yaml"
if ! grep -q -- '^  - \.\./ops-base$' "$gen/ops-namespaced/kustomization.yaml"; then
  bad "could not point the copied namespaced overlay at ops-base (its resources changed?)"
fi
for g in ops-all ops-namespaced ops-emulator; do
  t="kustomize $g (namespace ops)"
  file="$out/k-$g.yaml"
  log "$t"
  if ! render "$gen/$g" >"$file" 2>"$out/k-$g.err"; then
    sed 's/^/        /' "$out/k-$g.err"
    bad "$t: render"
    continue
  fi
  check_render "$t" "$file" --expect-namespace ops
done

# --- Helm chart -----------------------------------------------------------------
chart=deploy/helm/gar-restarter
# ci values file -> the namespace it is rendered in
declare -A helm_ns=([default]=gar-restarter [namespaced]=ops [full]=platform-tools [emulator]=gar-restarter)
log "helm chart $chart"
helm_bin=""
if [[ "${SKIP_HELM:-}" == 1 ]]; then
  printf '  skip  helm chart checks (SKIP_HELM=1)\n'
elif ! helm_bin="$(bash "$here/tools/helm.sh")"; then
  bad "no helm: deploy/tools/helm.sh could not build it (set HELM=/path/to/helm, or SKIP_HELM=1 to skip)"
  helm_bin=""
fi
if [[ -n "$helm_bin" ]]; then
  ok "helm $("$helm_bin" version --short 2>/dev/null) ($helm_bin)"
  if cmp -s "$chart/files/admission-policy.yaml" deploy/components/admission-policy/policy.yaml; then
    ok "$chart/files/admission-policy.yaml is a copy of deploy/components/admission-policy/policy.yaml"
  else
    bad "$chart/files/admission-policy.yaml differs from deploy/components/admission-policy/policy.yaml (copy it)"
  fi
  seen_values=0
  for vf in "$chart"/ci/*-values.yaml; do
    v="$(basename "$vf" -values.yaml)"
    ns="${helm_ns[$v]:-}"
    if [[ -z "$ns" ]]; then bad "$vf: no namespace for it in validate.sh's helm_ns table"; continue; fi
    seen_values=$((seen_values + 1))
    t="helm $v (namespace $ns)"
    if report="$("$helm_bin" lint --strict "$chart" -n "$ns" -f "$vf" 2>&1)"; then
      ok "$t: helm lint --strict"
    else
      printf '%s\n' "$report" | sed 's/^/        /'
      bad "$t: helm lint --strict"
    fi
    file="$out/helm-$v.yaml"
    if ! "$helm_bin" template gar-restarter "$chart" -n "$ns" -f "$vf" >"$file" 2>"$out/helm-$v.err"; then
      sed 's/^/        /' "$out/helm-$v.err"
      bad "$t: helm template"
      continue
    fi
    check_render "$t" "$file" --expect-namespace "$ns"
  done
  [[ $seen_values -ge 4 ]] || bad "expected at least 4 value sets in $chart/ci, found $seen_values"
  # Values the chart must refuse (schema or template checks), each with a
  # piece of the message that shows it was refused for the right reason.
  dg=sha256:0000000000000000000000000000000000000000000000000000000000000000
  refuse() {
    local why="$1" want="$2" got
    shift 2
    if got="$("$helm_bin" template gar-restarter "$chart" -n gar-restarter "$@" 2>&1)"; then
      bad "helm accepted $why"
    elif grep -qF -- "$want" <<<"$got"; then
      ok "helm refuses $why"
    else
      printf '%s\n' "$got" | sed 's/^/        /'
      bad "helm refused $why, but without \"$want\""
    fi
  }
  refuse 'replicas: "two" (schema)' "/replicas" --set "image.digest=$dg" --set-string replicas=two
  refuse "an unknown top-level key (schema)" "bogus" --set "image.digest=$dg" --set bogus=1
  refuse "a tag-only image by default" "image.digest is required"
  refuse "image.tag latest (schema)" "/image/tag" --set "image.digest=$dg" --set image.tag=latest
  refuse "a malformed digest (schema)" "/image/digest" --set image.digest=sha256:abc
  refuse "scope.mode namespaced without namespaces" "scope.namespaces must list" --set "image.digest=$dg" --set scope.mode=namespaced
  refuse "namespaces in cluster mode" "must be empty when scope.mode is cluster" --set "image.digest=$dg" --set "scope.namespaces={apps}"
  refuse "a subscription that is not projects/P/subscriptions/S (schema)" "/pubsub/subscription" --set "image.digest=$dg" --set pubsub.subscription=gar
  refuse "a scope.mode typo (schema)" "/scope/mode" --set "image.digest=$dg" --set scope.mode=clusterwide
  refuse "optIn as a string (schema)" "/optIn" --set "image.digest=$dg" --set-string optIn=yes
fi

# --- Grafana dashboard ------------------------------------------------------------
log "grafana dashboard vs the daemon's metrics"
dash="$here/grafana/gar-restarter.json"
if report="$(pyrun "$here/grafana/check_dashboard.py" "$dash" src/ops/metrics.rs 2>&1)"; then
  ok "$(tail -n1 <<<"$report")"
else
  printf '%s\n' "$report" | sed 's/^/        /'
  bad "deploy/grafana/gar-restarter.json queries metrics or labels the daemon does not define"
fi
if report="$(pyrun "$here/grafana/check_dashboard.py" --self-test "$dash" src/ops/metrics.rs 2>&1)"; then
  ok "check_dashboard.py --self-test: $(tail -n1 <<<"$report")"
else
  printf '%s\n' "$report" | sed 's/^/        /'
  bad "check_dashboard.py --self-test"
fi

log "cache shards vs src/index/cache/codec.rs"
codec=src/index/cache/codec.rs
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
  if [[ -s "$out/k-ops-all.yaml" ]] && report="$(cd "$out" && pyrun "$here/check_rbac.py" --self-test --expect-namespace ops k-ops-all.yaml 2>&1)"; then
    ok "check_rbac.py --self-test --expect-namespace ops (base + all components): $(tail -n1 <<<"$report" | sed 's/^self-test: //')"
  else
    printf '%s\n' "${report:-k-ops-all.yaml was not rendered}" | grep -v '^self-test: ok' | sed 's/^/        /'
    bad "check_rbac.py --self-test --expect-namespace ops"
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

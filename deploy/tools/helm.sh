#!/usr/bin/env bash
# Prints the path of the pinned helm binary, building it first if it is not
# cached yet.
#
#   helm="$(bash deploy/tools/helm.sh)" && "$helm" version
#
# The version is pinned by the Go module testsupport/helm (go.mod: a `tool
# helm.sh/helm/v4/cmd/helm` directive, helm.sh/helm/v4 v4.3.2; go.sum: every
# module's checksum). The binary is built from the Go module proxy with
#   CGO_ENABLED=0 go build -trimpath -o DIR/helm helm.sh/helm/v4/cmd/helm
# and cached outside the clone, in
#   $GAR_TOOLS_DIR/helm-<hash>/helm      (default /var/tmp/gar-restarter-tools)
# where <hash> is the SHA-256 of go.mod, go.sum and `go version`, so a bump of
# either file or of Go builds a new one and every clone/worktree shares it.
# Only the first build needs the network (the module download).
#
# To bump helm: cd testsupport/helm && go get -tool helm.sh/helm/v4/cmd/helm@vX.Y.Z
# && go mod tidy, and commit go.mod and go.sum.
#
# Environment:
#   HELM           use this helm instead (printed as is, nothing is built)
#   GO             go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   GAR_TOOLS_DIR  cache root (default /var/tmp/gar-restarter-tools)
# Exit 0 and the path on stdout, or exit 2 with the reason on stderr.
set -euo pipefail

if [[ -n "${HELM:-}" ]]; then
  command -v "$HELM" || { echo "helm.sh: HELM=$HELM is not executable" >&2; exit 2; }
  exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod="$(cd "$here/../../testsupport/helm" && pwd)"
tools="${GAR_TOOLS_DIR:-/var/tmp/gar-restarter-tools}"

go="${GO:-}"
if [[ -z "$go" ]]; then
  if command -v go >/dev/null 2>&1; then go="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then go=/usr/local/go/bin/go
  else
    echo "helm.sh: no go found (helm $(sed -n 's/^\s*helm.sh\/helm\/v4 \(v[^ ]*\).*/\1/p' "$mod/go.mod") needs Go $(sed -n 's/^go //p' "$mod/go.mod")+); set GO=... or HELM=..." >&2
    exit 2
  fi
fi
goversion="$("$go" version)" || { echo "helm.sh: $go does not run" >&2; exit 2; }

hash="$( { cat "$mod/go.mod" "$mod/go.sum"; echo "$goversion"; } | sha256sum | cut -c1-16)"
dir="$tools/helm-$hash"
bin="$dir/helm"
if [[ -x "$bin" ]] && "$bin" version --short >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

mkdir -p "$tools"
tmp="$(mktemp -d "$tools/.helm-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "helm.sh: building helm ($goversion) into $dir (once; later runs reuse it)" >&2
if ! (cd "$mod" && CGO_ENABLED=0 "$go" build -trimpath -o "$tmp/helm" helm.sh/helm/v4/cmd/helm) >"$tmp/log" 2>&1; then
  sed 's/^/  /' "$tmp/log" >&2
  echo "helm.sh: go build of helm failed (see above; the first build needs the Go module proxy)" >&2
  exit 2
fi
"$tmp/helm" version --short >/dev/null 2>&1 || { echo "helm.sh: the built helm does not run" >&2; exit 2; }
mkdir -p "$dir"
mv -f "$tmp/helm" "$bin.tmp.$$" && mv -f "$bin.tmp.$$" "$bin"
echo "$bin"

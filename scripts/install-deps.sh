#!/usr/bin/env bash
# Installs the system packages vha's build and tests need, when missing (a fresh machine has
# only the Rust toolchain, gcc and python3). Debian packages, as root (sudo otherwise).
#   cmake             - Pingora's zlib-ng and aws-lc builds
#   protobuf-compiler - etcd-client's build (protoc)
#   etcd-server       - the etcd backend's tests start real etcd processes
#   prometheus        - the dashboard test evaluates PromQL on a live Prometheus (promtool too)
#   openssl           - the cluster-channel test offers TLS 1.0/1.1/1.3 with `openssl s_client`
#   systemd           - `systemd-analyze verify` checks the example units
# Fails (never skips) when something cannot be installed.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian's prometheus package starts a service; tests start their own on ephemeral ports.
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl stop prometheus prometheus-node-exporter etcd >/dev/null 2>&1 || true
fi
for c in cmake protoc etcd prometheus promtool openssl systemd-analyze; do
  command -v "$c" >/dev/null 2>&1 || { echo "install-deps: $c still missing after install" >&2; exit 1; }
done

#!/usr/bin/env bash
# Installs the system packages vha's build and tests need, when missing (a fresh machine has
# only the Rust toolchain, gcc and python3). Debian packages, as root (sudo otherwise).
#   cmake             - Pingora's zlib-ng and aws-lc builds
#   protobuf-compiler - etcd-client's build (protoc)
#   libprotobuf-dev   - google/protobuf/*.proto that etcd-client's protos import (only a
#                       recommend of protobuf-compiler, and recommends are not installed)
#   etcd-server       - the etcd backend's tests start real etcd processes
#   prometheus        - the dashboard test evaluates PromQL on a live Prometheus (promtool too)
#   openssl           - the cluster-channel test offers TLS 1.0/1.1/1.3 with `openssl s_client`
#   systemd           - `systemd-analyze verify` checks the example units
#   iproute2          - the multi-host tests (t95) build test hosts with `ip netns` and veth
#                       pairs, and run processes inside them with `ip netns exec`
#   nftables          - the multi-host tests cut links between test hosts with `nft` rules
#   haproxy           - the load balancer topology test puts a real HAProxy in front of the pairs
#   nginx-light       - vha bench's nginx peer (an mTLS front and terminator), run by t60_bench
# Fails (never skips) when something cannot be installed.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# ip, nft and haproxy live in /usr/sbin, which a non-root PATH may leave out.
export PATH="$PATH:/usr/sbin:/sbin"
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian's prometheus, etcd and haproxy packages start services; tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl stop prometheus prometheus-node-exporter etcd haproxy nginx >/dev/null 2>&1 || true
fi
for c in cmake protoc etcd prometheus promtool openssl systemd-analyze ip nft haproxy nginx; do
  command -v "$c" >/dev/null 2>&1 || { echo "install-deps: $c still missing after install" >&2; exit 1; }
done
[ -f /usr/include/google/protobuf/descriptor.proto ] || { echo "install-deps: libprotobuf-dev's descriptor.proto still missing after install" >&2; exit 1; }

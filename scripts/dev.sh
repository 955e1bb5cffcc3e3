#!/usr/bin/env bash
# The README's "run the dev cluster" command: installs what a fresh machine lacks (cmake for
# Pingora's zlib-ng, protoc for etcd-client, ...: scripts/install-deps.sh), then runs
# `cargo run --release -- dev` with any arguments given (e.g. --nodes 5, --storage etcd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release -- dev "$@"

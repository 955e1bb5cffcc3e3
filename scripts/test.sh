#!/usr/bin/env bash
# vha's one test command (the README's): installs what is missing, then runs every check
# and every test: formatting, clippy with warnings denied, and the whole workspace's unit,
# property, doc and integration tests (real processes on 127.0.0.1, and on test hosts in
# network namespaces for t95_hosts, which needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# One-shot builds (CI, a fresh clone) gain nothing from incremental artifacts, which take
# gigabytes of disk; set CARGO_INCREMENTAL=1 to keep them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== unused dependencies"
python3 scripts/unused-deps.py
echo "== promtool: alerting rules and their unit tests"
promtool check rules grafana/alerts/vha-alerts.yml
(cd grafana/alerts && promtool test rules vha-alerts.test.yml)
echo "== cargo test"
cargo test --workspace --no-fail-fast
scripts/fuzz-smoke.sh

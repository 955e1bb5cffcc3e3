#!/usr/bin/env bash
# Bounded fuzz smoke run (issue 11): builds fuzz/ (outside the workspace, stable toolchain,
# shared target dir), replays every fuzz/regressions/<target>/ file, then mutates inputs for
# FUZZ_SECONDS (default 20) per target and prints the executions per target. Exits non-zero
# on any crash; the crashing input is saved under fuzz/regressions/<target>/.
# Usage: scripts/fuzz-smoke.sh [TARGET...]   (env: FUZZ_SECONDS, FUZZ_SEED)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
args=(--seconds "$seconds")
if [[ -n "${FUZZ_SEED:-}" ]]; then
    args+=(--seed "$FUZZ_SEED")
fi
echo "== fuzz smoke (${seconds}s per target)"
cargo run --quiet --manifest-path fuzz/Cargo.toml --target-dir "${CARGO_TARGET_DIR:-target}" -- "${args[@]}" "$@"

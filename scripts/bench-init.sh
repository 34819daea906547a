#!/usr/bin/env bash
# Benchmark of `coral init` on the umockdev-emulated Coral (see scripts/bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# coral, and the fake `xe` of the dev-only test kit.
cargo build --quiet --release --workspace --bins
exec /usr/bin/python3 scripts/bench.py init "${1:-10}"

#!/usr/bin/env bash
# Benchmark of `coral up` scenarios and the manual procedure (see scripts/bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --bins
exec /usr/bin/python3 scripts/bench.py up

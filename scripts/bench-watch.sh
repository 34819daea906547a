#!/usr/bin/env bash
# `coral watch` figures on the emulated Coral and the fake xe (umockdev):
# from the boot loader appearing (a brownout) to the VUSB existing, and to
# the VM running again with --restart; then CPU time and peak RSS of one
# idle minute (read from /proc just before SIGTERM at 61 s).
#
#   scripts/bench-watch.sh [CORAL_BIN]     (default: the debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n "${1:-}" ]] && export CORAL_TEST_BIN="$1"
echo "==> recovery times (5 runs each)"
cargo test --quiet --test e2e_watch figures -- --ignored --nocapture 2>&1 | grep '^watch,'
echo "==> one idle minute"
cargo test --quiet --test e2e_watch idle_minute -- --ignored --nocapture 2>&1 | grep '^idle'

#!/usr/bin/env bash
# The watcher's soak test, longer than CI's slice: many random stories of
# simulated weeks (drops, silent re-enumerations, Corals gone, xapi
# outages, late scans, slow and failed shutdowns and starts, SIGTERM,
# SIGHUP with config edits, pauses), invariants checked at every step.
# Prints the virtual days lived and the faults survived.
#
#   scripts/soak.sh [STORIES] [DAYS_PER_STORY] [SEED]   (default 60 30 17)
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_CASES="${1:-60}" SOAK_DAYS="${2:-30}" SOAK_SEED="${3:-17}"
started=$(date +%s)
status=0
out=$(cargo test --release --quiet --test soak -- --nocapture 2>&1) || status=$?
grep -E '^soak:|Test failed|minimal failing' <<<"$out" || true
echo "soak: ${SOAK_CASES} stories of up to ${SOAK_DAYS} days (seed ${SOAK_SEED}) in $(( $(date +%s) - started )) s of wall time"
if (( status != 0 )); then
    grep -A40 'minimal failing' <<<"$out" >&2 || true
    echo "soak: FAILED" >&2
    exit 1
fi

#!/usr/bin/env bash
# Build-time embedding: CORAL_EMBED_FIRMWARE with a known image gives a
# binary that needs no firmware file; an unknown image fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The image the tests use: $CORAL_TEST_FIRMWARE_DIR, else ../shared/firmware.
dir=$(realpath -m "${CORAL_TEST_FIRMWARE_DIR:-../shared/firmware}")
image=$dir/apex_latest_single_ep.bin
if [[ ! -f $image ]]; then
    reason="the firmware image apex_latest_single_ep.bin is absent from $dir; \`cargo run -- firmware fetch --dir $dir\` supplies it"
    if [[ ${CI:-} == true || ${CI:-} == 1 ]]; then
        echo "check-embed: $reason (CI=true: a missing prerequisite fails the run)" >&2
        exit 1
    fi
    echo "check-embed: skipped: $reason"
    # Counted by scripts/test.sh like a skipped test.
    if [[ -n ${CORAL_SKIP_LOG:-} ]]; then echo "scripts/check-embed.sh: $reason" >> "$CORAL_SKIP_LOG"; fi
    exit 0
fi
image=$(realpath "$image")
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export CARGO_TARGET_DIR="$target_dir/embed"
CORAL_EMBED_FIRMWARE="$image" cargo build --quiet --bin coral
out=$(CORAL_FIRMWARE_DIR=/nonexistent "$CARGO_TARGET_DIR/debug/coral" firmware show)
echo "$out"
grep -q "from:   embedded in this binary" <<<"$out" || { echo "check-embed: image not embedded" >&2; exit 1; }
bogus=$(mktemp)
trap 'rm -f "$bogus"' EXIT
head -c 10783 /dev/zero > "$bogus"
if CORAL_EMBED_FIRMWARE="$bogus" cargo build --quiet --bin coral 2>/dev/null; then
    echo "check-embed: an unknown image was embedded" >&2
    exit 1
fi
echo "check-embed: ok (known image embedded, unknown image refused by build.rs)"

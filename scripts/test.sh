#!/usr/bin/env bash
# The whole test suite (README: "Test"). Installs missing Debian packages when
# run as root, then: formatting, lints, unit + end-to-end tests (debug build),
# the systemd unit check, the glibc-2.17 release build and RPM with their
# checks, and the end-to-end suite once more against that release binary.
# Honours CARGO_TARGET_DIR. The last line is always the test summary:
# `N passed, M failed, K skipped`.
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    fmt, clippy and cargo test only
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
if [[ "${1:-}" == "--quick" ]]; then quick=true; fi

current="setup"
step() { current="$*"; printf '\n==> %s\n' "$*"; }

# Where cargo writes: CARGO_TARGET_DIR (relative or absolute) or ./target.
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$target_dir"
# Tests that lack a prerequisite (and CI is not set) append a line here
# (coral_testkit::e2e::skip); the summary counts them as skipped.
export CORAL_SKIP_LOG="$target_dir/coral-skipped.log"
: > "$CORAL_SKIP_LOG"
results="$target_dir/coral-test-results.log"
: > "$results"

# `cargo test` prints one "test result: …" line per test binary. Skipped
# tests return early, so cargo counts them as passed: they move to skipped.
summary() {
    local status=$?
    local passed failed ignored skipped
    read -r passed failed ignored < <(awk '
        /^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i+1) ~ /^passed;?$/) p += $i
                if ($(i+1) ~ /^failed;?$/) f += $i
                if ($(i+1) ~ /^ignored;?$/) g += $i
            }
        }
        END { print p + 0, f + 0, g + 0 }' "$results")
    # One line per skipped test and run ("<test>: <reason>"): cargo counted
    # each such run as passed; the summary counts each test once and says
    # each reason once, with how many tests it kept from running.
    local skipped_runs
    skipped_runs=$(( $(grep -c '^[^ ]*::' "$CORAL_SKIP_LOG" || true) ))  # cargo tests only
    skipped=$(cut -d' ' -f1 "$CORAL_SKIP_LOG" | sort -u | grep -c . || true)
    if (( skipped > 0 )); then
        echo
        echo "skipped ($CORAL_SKIP_LOG names each test):"
        sort -u "$CORAL_SKIP_LOG" | sed 's/^[^ ]* //' | sort | uniq -c | sort -rn |
            awk '{ n = $1; $1 = ""; sub(/^ /, ""); printf "  %d test(s): %s\n", n, $0 }'
    fi
    if (( status != 0 )); then
        echo
        echo "test.sh: failed at: $current (exit $status)"
    fi
    echo "$(( passed > skipped_runs ? passed - skipped_runs : 0 )) passed, $failed failed, $(( skipped + ignored )) skipped"
    exit "$status"
}
trap summary EXIT

# Debian packages the tests use: umockdev (emulated USB device), gi bindings
# for the emulator, libusb headers for rusb (debug builds link the system
# libusb), dfu-util (an independent DFU host), systemd (systemd-analyze
# verify), rpm (rpmbuild and the package checks), binutils (objdump), curl
# (firmware fetch).
packages=(umockdev gir1.2-umockdev-1.0 python3-gi libusb-1.0-0-dev pkg-config
          dfu-util systemd rpm binutils curl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        step "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
fi
if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then
    rustup component add clippy rustfmt
fi

# One cargo test run: output shown, and kept for the summary.
run_tests() {
    local log=$1
    shift
    local status
    set +e
    cargo test --quiet --no-fail-fast "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    grep '^test result:' "$log" >> "$results" || true
    return "$status"
}

# The suite leaves the machine's own coral files as it found them: every run
# of coral in the tests has its own CORAL_STATE_DIR and CORAL_CONFIG
# (coral_testkit::e2e::isolated_env). Checked after each cargo test run.
# What counts is what they hold (type, mode, contents), not when they were
# last written.
host_files() {
    find /var/lib/coral /etc/coral -printf '%p %y %m\n' 2>/dev/null | sort || true
    find /var/lib/coral /etc/coral -type f -exec sha256sum {} + 2>/dev/null | sort || true
}
host_files_before=$(host_files)
check_host_files() {
    local now
    now=$(host_files)
    if [[ "$now" != "$host_files_before" ]]; then
        echo "the tests changed /var/lib/coral or /etc/coral on this machine:" >&2
        diff <(echo "$host_files_before") <(echo "$now") >&2 || true
        echo "(another coral or test run on this machine at the same time writes there too: rerun alone to tell)" >&2
        return 1
    fi
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test --workspace (unit, simulators, end-to-end through libusb + umockdev + fake xe)"
run_tests "$target_dir/test-debug.log" --workspace
step "the machine's /var/lib/coral and /etc/coral are as the tests found them"
check_host_files
if $quick; then exit 0; fi

step "systemd-analyze verify of the generated unit"
scripts/check-service.sh

step "firmware embedded at build time (CORAL_EMBED_FIRMWARE)"
scripts/check-embed.sh

step "release build for glibc 2.17 (cargo-zigbuild, static libusb) + RPM"
scripts/release.sh --rpm
scripts/check-release.sh build/release/coral

step "end-to-end suite against the release binary"
CORAL_TEST_BIN="$PWD/build/release/coral" run_tests "$target_dir/test-release.log" --test 'e2e_*'
step "the machine's /var/lib/coral and /etc/coral are as the tests found them"
check_host_files

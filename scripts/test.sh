#!/usr/bin/env bash
# The whole test suite (README: "Test"). Installs missing Debian packages when
# run as root, then: formatting, lints, unit + end-to-end tests (debug build),
# the systemd unit check, the glibc-2.17 release build with its checks, and the
# end-to-end suite once more against that release binary.
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    fmt, clippy and cargo test only
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[[ "${1:-}" == "--quick" ]] && quick=true

step() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests use: umockdev (emulated USB device), gi bindings
# for the emulator, libusb headers for rusb (debug builds link the system
# libusb), dfu-util (an independent DFU host), systemd (systemd-analyze
# verify), rpm (listing the package), binutils (objdump), curl (firmware fetch).
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
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test (unit, simulators, end-to-end through libusb + umockdev + fake xe)"
cargo test --quiet 2>&1 | tee target/test-debug.log
$quick && exit 0

step "systemd-analyze verify of the generated unit"
scripts/check-service.sh

step "firmware embedded at build time (CORAL_EMBED_FIRMWARE)"
scripts/check-embed.sh

step "release build for glibc 2.17 (cargo-zigbuild, static libusb) + RPM"
scripts/release.sh --rpm
scripts/check-release.sh build/release/coral

step "end-to-end suite against the release binary"
CORAL_TEST_BIN="$PWD/build/release/coral" cargo test --quiet --test 'e2e_*' 2>&1 | tee target/test-release.log

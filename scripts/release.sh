#!/usr/bin/env bash
# Release build for an XCP-ng dom0 (CentOS 7, glibc 2.17): x86_64, libusb
# compiled in (rusb `vendored`), with cargo-zigbuild from PyPI.
#
#   scripts/release.sh          build/release/coral
#   scripts/release.sh --rpm    also build/release/coral-<version>-1.x86_64.rpm
#
# CORAL_EMBED_FIRMWARE=/path/apex_latest_single_ep.bin embeds the image
# (checked against firmware/manifest.txt by build.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

rpm=false
[[ "${1:-}" == "--rpm" ]] && rpm=true

target=x86_64-unknown-linux-gnu
out=build/release
mkdir -p "$out" build/cache
# Keep zig's and cargo-zigbuild's caches inside the build folder.
export XDG_CACHE_HOME="$PWD/build/cache"
export ZIG_GLOBAL_CACHE_DIR="$PWD/build/cache/zig"

if ! command -v cargo-zigbuild >/dev/null; then
    echo "==> installing cargo-zigbuild (PyPI)"
    python3 -m pip install --quiet cargo-zigbuild
fi
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"

echo "==> cargo zigbuild --release --features vendored --target $target.2.17"
cargo zigbuild --quiet --release --locked --features vendored --target "$target.2.17" --bin coral
cp "target/$target/release/coral" "$out/coral"
ls -l "$out/coral"

if $rpm; then
    if ! command -v cargo-generate-rpm >/dev/null; then
        echo "==> installing cargo-generate-rpm (crates.io)"
        cargo install --quiet --locked cargo-generate-rpm
    fi
    # The unit as `coral service install --vm frigate` writes it, shipped disabled.
    rm -rf build/rpm && mkdir -p build/rpm
    "$out/coral" service install --vm frigate --root build/rpm/root >/dev/null
    sed 's|^ExecStart=.* up |ExecStart=/usr/bin/coral up |' build/rpm/root/etc/systemd/system/coral-up.service > build/rpm/coral-up.service
    cargo generate-rpm --target "$target" --output "$out/"
    ls -l "$out"/*.rpm
fi

#!/usr/bin/env bash
# Release build for an XCP-ng dom0 (CentOS 7, glibc 2.17): x86_64, libusb
# compiled in (rusb `vendored`), with cargo-zigbuild from PyPI.
#
#   scripts/release.sh          build/release/coral
#   scripts/release.sh --rpm    also build/release/coral-<version>-1.x86_64.rpm
#
# CORAL_EMBED_FIRMWARE=/path/apex_latest_single_ep.bin embeds the image
# (checked against firmware/manifest.txt by build.rs). CARGO_TARGET_DIR is
# honoured: the binary is taken from wherever cargo put it.
#
# The RPM is built by rpmbuild (Debian package `rpm`) from scripts/rpm/coral.spec:
# cargo-generate-rpm (0.21) can write a gzip payload and scriptlets, but has
# no %changelog, no %license file and no description apart from the summary.
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

# Where cargo writes (CARGO_TARGET_DIR, relative or not, or ./target).
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
version=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "coral"))')

echo "==> cargo zigbuild --release --features vendored --target $target.2.17"
cargo zigbuild --quiet --release --locked --features vendored --target "$target.2.17" --bin coral
cp "$target_dir/$target/release/coral" "$out/coral"
ls -l "$out/coral"

$rpm || exit 0

command -v rpmbuild >/dev/null || { echo "release: rpmbuild is missing (Debian package rpm)" >&2; exit 1; }
stage="$PWD/build/rpm"
rm -rf "$stage" "$out"/*.rpm
mkdir -p "$stage/man"
cp "$out/coral" scripts/rpm/LICENSE README.md "$stage/"

# The units exactly as `coral service install` writes them (written here
# into a simulated host's root, so no xe is needed), with ExecStart pointing
# at /usr/bin/coral. They name no VM: the entries live in
# /etc/coral/coral.toml. Shipped disabled; `coral service install --vm …`
# adds an entry and writes and enables the units under /etc/systemd/system.
CORAL_SIM_STATE="$stage/sim.json" "$out/coral" -q --simulate service install --vm frigate
for unit in coral-up.service coral-watch.service; do
    sed -E 's|^ExecStart=[^ ]*/coral |ExecStart=/usr/bin/coral |' \
        "$stage/sim.root/etc/systemd/system/$unit" > "$stage/$unit"
    if grep -q -e '--vm' -e 'frigate' "$stage/$unit"; then
        echo "release: the packaged $unit would name a VM:" >&2
        cat "$stage/$unit" >&2
        exit 1
    fi
done
rm -rf "$stage/sim.json" "$stage/sim.root"

"$out/coral" completions bash > "$stage/coral.bash"
"$out/coral" -q man --dir "$stage/man"
gzip -9n "$stage"/man/*.1

echo "==> rpmbuild (gzip payload) coral $version"
rpmbuild -bb --quiet --target x86_64 \
    --define "_topdir $stage/top" \
    --define "_sourcedir $stage" \
    --define "_rpmdir $PWD/$out" \
    --define "_rpmfilename %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "coral_version $version" \
    scripts/rpm/coral.spec
rm -rf "$stage/top"
ls -l "$out"/*.rpm

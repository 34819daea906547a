#!/usr/bin/env bash
# Checks a release binary: it must start on glibc 2.17 (no newer symbol
# version), link libusb statically, need only libc/libpthread/libdl/libm/the
# loader, and stay small. Lists the RPM when there is one.
set -euo pipefail
bin=${1:?usage: scripts/check-release.sh BINARY}
fail() { echo "check-release: $*" >&2; exit 1; }

max=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)
echo "highest glibc symbol version: $max"
[[ "$(printf '%s\nGLIBC_2.17\n' "$max" | sort -V | tail -1)" == "GLIBC_2.17" ]] || fail "needs $max > GLIBC_2.17"

needed=$(objdump -p "$bin" | awk '/NEEDED/ {print $2}' | sort | tr '\n' ' ')
echo "needs: $needed"
for lib in $needed; do
    case "$lib" in
        libc.so.6|libpthread.so.0|libdl.so.2|libm.so.6|librt.so.1|ld-linux-x86-64.so.2|libgcc_s.so.1) ;;
        *) fail "unexpected dynamic dependency $lib" ;;
    esac
done
[[ "$needed" != *libusb* ]] || fail "libusb must be linked statically"
[[ "$needed" != *libgcc_s* ]] || fail "libgcc_s is not on every dom0"

size=$(stat -c %s "$bin")
echo "size: $size bytes"
(( size <= 1572864 )) || fail "larger than 1.5 MB"
"$bin" --version

rpm_file=$(ls "$(dirname "$bin")"/*.rpm 2>/dev/null | head -1 || true)
if [[ -n "$rpm_file" ]]; then
    echo "RPM $rpm_file:"
    rpm -qlp "$rpm_file" | tee build/rpm-contents.txt
    for f in /usr/bin/coral /usr/lib/systemd/system/coral-up.service /usr/share/doc/coral/README.md; do
        grep -qx "$f" build/rpm-contents.txt || fail "RPM lacks $f"
    done
fi
echo "check-release: ok"

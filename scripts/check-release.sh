#!/usr/bin/env bash
# Checks a release binary: it must start on glibc 2.17 (no newer symbol
# version), link libusb statically, need only libc/libpthread/libdl/libm/the
# loader, and stay small. When the RPM is beside it, checks what dom0's
# rpm 4.11 and its admin will meet: payload compressor, requires, scriptlets,
# file list, %license, changelog, description, and a unit naming no VM.
#
#   scripts/check-release.sh build/release/coral [RPM]
set -euo pipefail
bin=${1:?usage: scripts/check-release.sh BINARY [RPM]}
fail() { echo "check-release: $*" >&2; exit 1; }

max=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)
echo "highest glibc symbol version: $max"
[[ "$(printf '%s\nGLIBC_2.17\n' "$max" | sort -V | tail -1)" == "GLIBC_2.17" ]] || fail "needs $max > GLIBC_2.17"

needed=$(objdump -p "$bin" | awk '/NEEDED/ {print $2}' | sort | tr '\n' ' ')
echo "needs: $needed"
for lib in $needed; do
    case "$lib" in
        libc.so.6|libpthread.so.0|libdl.so.2|libm.so.6|librt.so.1|ld-linux-x86-64.so.2) ;;
        *) fail "unexpected dynamic dependency $lib (libusb must be static; libgcc_s is not on every dom0)" ;;
    esac
done

size=$(stat -c %s "$bin")
echo "size: $size bytes"
# dom0 has little memory: one static binary of at most 2 MiB (libusb, clap
# with its completion and man page generators, the TOML parser included).
(( size <= 2097152 )) || fail "larger than 2 MiB"
"$bin" --version

rpm_file=${2:-}
if [[ -z "$rpm_file" ]]; then
    rpm_file=$(find "$(dirname "$bin")" -maxdepth 1 -name '*.rpm' | sort | tail -1)
fi
if [[ -z "$rpm_file" ]]; then
    echo "check-release: ok (no RPM beside the binary)"
    exit 0
fi
q() { rpm -qp --nosignature "$@" "$rpm_file"; }
echo "RPM $rpm_file"

# Payload: rpm 4.11 reads gzip, bzip2 and xz, not zstd.
compressor=$(q --queryformat '%{PAYLOADCOMPRESSOR}')
echo "payload compressor: $compressor"
[[ "$compressor" == gzip || "$compressor" == xz ]] || fail "payload $compressor: rpm 4.11 cannot read it"

# Requires: what rpm 4.11 provides itself, glibc <= 2.17, /bin/sh and
# systemd for the scriptlets; nothing else.
echo "requires:"
q -R | sed 's/^/  /'
while read -r req; do
    case "$req" in
        "rpmlib(CompressedFileNames) <= 3.0.4-1" | "rpmlib(FileDigests) <= 4.6.0-1" | \
        "rpmlib(PayloadFilesHavePrefix) <= 4.0-1" | "rpmlib(PayloadIsXz) <= 5.2-1") ;;
        rpmlib*) fail "requires $req, which rpm 4.11 may not provide" ;;
        "/bin/sh" | "systemd" | "rtld(GNU_HASH)") ;;
        "libc.so.6()(64bit)" | "libpthread.so.0()(64bit)" | "libdl.so.2()(64bit)" | "libm.so.6()(64bit)" | \
        "librt.so.1()(64bit)" | "ld-linux-x86-64.so.2()(64bit)") ;;
        *"(GLIBC_"*)
            v=${req##*(GLIBC_}; v=${v%%)*}
            [[ "$(printf '%s\n2.17\n' "$v" | sort -V | tail -1)" == "2.17" ]] || fail "requires $req > GLIBC_2.17"
            case "$req" in
                libc.so.6* | libpthread.so.0* | libdl.so.2* | libm.so.6* | librt.so.1* | ld-linux-x86-64.so.2*) ;;
                *) fail "unexpected requirement $req" ;;
            esac ;;
        *) fail "unexpected requirement $req" ;;
    esac
done < <(q -R | sed 's/ *$//')

# Scriptlets: daemon-reload after install/upgrade and after erase; on erase
# only ($1 = 0) disable and stop; nothing ever enables, starts or restarts.
scripts=$(q --scripts)
echo "$scripts" | sed 's/^/  /'
postin=$(q --queryformat '%{POSTIN}')
preun=$(q --queryformat '%{PREUN}')
postun=$(q --queryformat '%{POSTUN}')
grep -q 'systemctl daemon-reload' <<<"$postin" || fail "%post does not run systemctl daemon-reload"
grep -q 'systemctl daemon-reload' <<<"$postun" || fail "%postun does not run systemctl daemon-reload"
grep -q '"$1" -eq 0' <<<"$preun" || fail "%preun does not tell erase from upgrade"
grep -q 'systemctl --no-reload disable coral-up.service coral-watch.service' <<<"$preun" || fail "%preun does not disable coral-up.service and coral-watch.service"
grep -q 'systemctl stop coral-up.service coral-watch.service' <<<"$preun" || fail "%preun does not stop coral-up.service and coral-watch.service"
# The one restart allowed: a running watcher, on upgrade only (it touches no VM).
grep -q 'systemctl try-restart coral-watch.service' <<<"$postun" || fail "%postun does not restart a running watcher on upgrade"
if grep -v 'systemctl try-restart coral-watch.service' <<<"$scripts" |
    grep -Eq 'systemctl( --[a-z-]+)* (enable|preset|start|restart|try-restart|reload-or-restart|condrestart)'; then
    fail "a scriptlet enables, starts or restarts something"
fi
[[ "$(q --queryformat '%{PREIN}')" == "(none)" ]] || fail "unexpected %pre scriptlet"

# File list: exactly these (plus one man page per command).
files=$(q -l)
echo "files:"
echo "$files" | sed 's/^/  /'
for f in /usr/bin/coral /usr/lib/systemd/system/coral-up.service /usr/lib/systemd/system/coral-watch.service \
    /usr/share/bash-completion/completions/coral /usr/share/doc/coral/README.md \
    /usr/share/licenses/coral/LICENSE /usr/share/man/man1/coral.1.gz /usr/share/man/man1/coral-up.1.gz; do
    grep -qx "$f" <<<"$files" || fail "RPM lacks $f"
done
while read -r f; do
    case "$f" in
        /usr/bin/coral | /usr/lib/systemd/system/coral-up.service | /usr/lib/systemd/system/coral-watch.service | \
        /usr/share/bash-completion/completions/coral | \
        /usr/share/doc/coral | /usr/share/doc/coral/README.md | /usr/share/licenses/coral | \
        /usr/share/licenses/coral/LICENSE | /usr/share/man/man1/coral*.1.gz) ;;
        *) fail "unexpected file in the RPM: $f" ;;
    esac
done <<<"$files"
[[ "$(q --queryformat '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' | grep LICENSE)" == "l /usr/share/licenses/coral/LICENSE" ]] \
    || fail "LICENSE is not a %license file"
modes=$(q --queryformat '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]')
grep -qx -- '-rwxr-xr-x root:root /usr/bin/coral' <<<"$modes" || fail "/usr/bin/coral mode/owner: $(grep bin/coral <<<"$modes")"

# The packaged units are the staged ones (same digest), and name no VM.
for name in coral-up.service coral-watch.service; do
    unit=build/rpm/$name
    [[ -f "$unit" ]] || continue
    digest=$(q --queryformat '[%{FILEDIGESTS} %{FILENAMES}\n]' | awk -v f="/usr/lib/systemd/system/$name" '$2 == f {print $1}')
    [[ "$digest" == "$(sha256sum "$unit" | cut -d' ' -f1)" ]] || fail "packaged $name differs from $unit"
    grep -Eqx 'ExecStart=/usr/bin/coral (--lock-timeout [0-9]+ up|watch)' "$unit" || fail "packaged $name: $(grep ExecStart "$unit")"
    ! grep -q -e '--vm' "$unit" || fail "packaged $name names a VM"
done

# Changelog (newest entry for this version-release), a real description.
version=$(q --queryformat '%{VERSION}-%{RELEASE}')
first=$(q --changelog | head -1)
echo "changelog: $first"
[[ "$first" == "* "*" - $version" ]] || fail "newest changelog entry is not for $version: $first"
summary=$(q --queryformat '%{SUMMARY}')
description=$(q --queryformat '%{DESCRIPTION}')
[[ "$description" != "$summary" && $(wc -l <<<"$description") -ge 5 ]] || fail "the description only repeats the summary"
echo "check-release: ok"

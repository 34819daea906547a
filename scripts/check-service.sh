#!/usr/bin/env bash
# The generated boot unit must pass `systemd-analyze verify`. XCP-ng's own
# units (xapi-init-complete.target, xapi-domains.service) do not exist here:
# the check adds stand-ins for them so nothing else is excused.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin coral
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/debug/coral"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

"$bin" service install --vm 'my "cam" vm $x 100%' --start --root "$root"
unit="$root/etc/systemd/system/coral-up.service"
cat "$unit"
stubs="$root/stubs"
mkdir -p "$stubs"
printf '[Unit]\nDescription=stand-in for XCP-ng\n' > "$stubs/xapi-init-complete.target"
printf '[Unit]\nDescription=stand-in for XCP-ng\n[Service]\nType=oneshot\nExecStart=/bin/true\n' > "$stubs/xapi-domains.service"
cp "$unit" "$stubs/"
SYSTEMD_UNIT_PATH="$stubs:" systemd-analyze verify "$stubs/coral-up.service"
echo "check-service: systemd-analyze verify passed"

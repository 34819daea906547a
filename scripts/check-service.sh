#!/usr/bin/env bash
# The generated boot and watch units must pass `systemd-analyze verify`. XCP-ng's own
# units (xapi-init-complete.target, xapi-domains.service) do not exist here:
# the check adds stand-ins for them so nothing else is excused. The unit is
# made by `coral --simulate service install`, which writes only into the
# simulated host's own root (next to its state file), never into /etc.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin coral
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/debug/coral"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export CORAL_SIM_STATE="$work/sim.json"
"$bin" -q --simulate service install --vm frigate --start
unit="$work/sim.root/etc/systemd/system/coral-up.service"
cat "$unit"
grep -qx 'TimeoutStartSec=240' "$unit"
grep -qx 'Before=xapi-domains.service' "$unit"
# A stop must not kill an `xe vm-shutdown` in flight (xapi-usb.md, systemd 219).
grep -qx 'KillMode=mixed' "$unit"
if grep -Eq '^(Restart|Requires|RequiredBy)=' "$unit"; then
    echo "check-service: the unit must not use Restart= (systemd 219 oneshot) nor Requires" >&2
    exit 1
fi
stubs="$work/stubs"
mkdir -p "$stubs"
printf '[Unit]\nDescription=stand-in for XCP-ng\n' > "$stubs/xapi-init-complete.target"
printf '[Unit]\nDescription=stand-in for XCP-ng\n[Service]\nType=oneshot\nExecStart=/bin/true\n' > "$stubs/xapi-domains.service"
watch="$work/sim.root/etc/systemd/system/coral-watch.service"
cat "$watch"
grep -qx 'Restart=on-failure' "$watch"
grep -qx 'KillMode=mixed' "$watch"
grep -qx 'ExecReload=/bin/kill -HUP $MAINPID' "$watch"
grep -qx 'After=xapi-init-complete.target coral-up.service' "$watch"
cp "$unit" "$watch" "$stubs/"
SYSTEMD_UNIT_PATH="$stubs:" systemd-analyze verify "$stubs/coral-up.service" "$stubs/coral-watch.service"
echo "check-service: systemd-analyze verify passed (coral-up.service, coral-watch.service)"

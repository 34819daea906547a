//! Steps `attach`, `up`, `detach` and `status` share: the ready Coral on
//! this host's USB, the VM named by `--vm`, the Coral's PUSB in XAPI, and
//! the one place where a typed `xe` failure becomes a worded one.

use super::init::select_coral;
use crate::clock::Clock;
use crate::error::{fail, fail_then, FailureKind, Flag, NextStep};
use crate::usb::{CoralDevice, CoralState, NodeCheck, UsbBus};
use crate::xe::client::{PusbInfo, VmInfo, XeClient};
use crate::xe::{looks_like_uuid, XeError};
use std::time::Duration;

/// When XAPI's scan of a change is first looked for, after the change was
/// seen on USB: udev's scan needs sm's `usb-scan.service` to start `xe
/// pusb-scan` (a process, like every `xe` call) and xapi to read sysfs.
pub const SCAN_FIRST_LOOK: Duration = Duration::from_millis(300);
/// The pause between two looks (`pusb-list`) while the scan is expected.
pub const SCAN_FAST_POLL: Duration = Duration::from_millis(100);
/// How long after the first look the pauses stay [`SCAN_FAST_POLL`]; then
/// each pause doubles up to [`SCAN_SLOW_POLL`].
pub const SCAN_FAST_PHASE: Duration = Duration::from_secs(3);
/// The longest pause between two looks (a scan that is late is rarely
/// quick once late).
pub const SCAN_SLOW_POLL: Duration = Duration::from_secs(1);
/// After a reset, `xe pusb-scan` is asked for only when udev's own scan has
/// not listed the Coral this long after the first look (udev triggers one
/// at every USB change; the ask is for a host whose udev rule is missing).
pub const SCAN_KICK_AFTER: Duration = Duration::from_secs(2);

/// The pauses between looks at XAPI's scan: quick while it is expected,
/// then backing off. `since`: time from the first look.
pub fn scan_pause(since: Duration) -> Duration {
    if since < SCAN_FAST_PHASE {
        return SCAN_FAST_POLL;
    }
    let slow_for = (since - SCAN_FAST_PHASE).as_millis();
    let doublings = u32::try_from(slow_for / SCAN_SLOW_POLL.as_millis()).unwrap_or(u32::MAX);
    SCAN_FAST_POLL
        .saturating_mul(2u32.saturating_pow(doublings.saturating_add(1)))
        .min(SCAN_SLOW_POLL)
}

/// Poll `probe` at the pace of XAPI's scan ([`scan_pause`]) until it yields
/// `Some` or `timeout` passes (`Ok(None)`); `first_look`: the pause before
/// the first probe (capped by the timeout).
pub fn poll_scan<T, E>(
    clock: &dyn Clock,
    timeout: Duration,
    first_look: Duration,
    mut probe: impl FnMut(Duration) -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    // Never past the clock's deadline (the boot budget); a wait before a
    // step, so a stop (SIGTERM) ends it too.
    let timeout = crate::clock::capped(clock, timeout);
    let deadline = crate::clock::deadline_after(clock, timeout);
    clock.sleep(first_look.min(timeout));
    let first = clock.now();
    loop {
        if let Some(found) = probe(clock.now().saturating_sub(first))? {
            return Ok(Some(found));
        }
        let now = clock.now();
        if now >= deadline || clock.stop_requested() {
            return Ok(None);
        }
        clock.sleep(scan_pause(now.saturating_sub(first)).min(deadline - now));
    }
}

/// The ready Coral to pass through: `--device`, else the only ready one.
pub fn ready_coral(usb: &dyn UsbBus, device: Option<&str>) -> anyhow::Result<CoralDevice> {
    let corals = usb
        .list_corals()
        .map_err(|e| fail(FailureKind::Usb, format!("listing USB devices: {e}")))?;
    let ready: Vec<CoralDevice> = corals
        .iter()
        .filter(|c| c.state == CoralState::Ready)
        .cloned()
        .collect();
    let coral = match device {
        Some(_) => select_coral(&corals, device)?,
        None if ready.is_empty() && !corals.is_empty() => select_coral(&corals, None)?,
        None => select_coral(&ready, None)?,
    };
    if coral.state != CoralState::Ready {
        return Err(fail_then(
            FailureKind::NoCoral,
            format!("the Coral at {} is not initialized (1a6e:089a)", coral.path),
            NextStep::InitFirst,
        ));
    }
    Ok(coral)
}

/// A `--vm` value XAPI can be asked about: not empty, no line break (xe
/// sends its arguments as lines, so such a name can never reach XAPI intact).
pub fn check_vm_spec(spec: &str) -> anyhow::Result<()> {
    if spec.trim().is_empty() {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "{} is empty; give a VM uuid or its exact name-label",
                Flag::Vm
            ),
        ));
    }
    if spec.contains(['\n', '\r']) {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "{} {spec:?} holds a line break, which xe cannot pass to XAPI; give the VM's uuid (`xe vm-list params=uuid,name-label`)",
                Flag::Vm
            ),
        ));
    }
    Ok(())
}

/// The VM `--vm` names, resolved once.
#[derive(Clone, Debug)]
pub struct Vm {
    /// What XAPI says about it.
    pub info: VmInfo,
    /// How messages name it: `VM 'name'` as given, or `VM <uuid>`.
    pub label: String,
}

impl Vm {
    /// Its uuid.
    pub fn uuid(&self) -> &str {
        &self.info.uuid
    }
}

/// The one VM whose uuid or exact name-label is `spec`. The record read
/// holds no free text (its name is the filter, never parsed), so a name
/// posing as other fields cannot steer it; a uuid given is checked against
/// the record.
pub fn resolve_vm(xe: &XeClient, spec: &str) -> anyhow::Result<Vm> {
    check_vm_spec(spec)?;
    let vms = xe
        .find_vms(spec)
        .map_err(|e| xe_fail("looking up the VM", e))?;
    pick_vm(spec, vms)
}

/// The one VM among `vms` (the answer of a lookup of `spec`), or why not.
pub fn pick_vm(spec: &str, mut vms: Vec<VmInfo>) -> anyhow::Result<Vm> {
    match vms.len() {
        0 => Err(fail_then(
            FailureKind::Vm,
            format!("VM '{spec}' not found on this pool"),
            NextStep::ListVms,
        )),
        1 => {
            let info = vms.remove(0);
            let by_uuid = looks_like_uuid(spec) && info.uuid == spec;
            if looks_like_uuid(spec) && !by_uuid {
                log::debug!("'{spec}' is the name of VM {}", info.uuid);
            }
            let label = if by_uuid {
                format!("VM {}", info.uuid)
            } else {
                format!("VM '{spec}'")
            };
            Ok(Vm { info, label })
        }
        n => Err(fail_then(
            FailureKind::Vm,
            format!(
                "{n} VMs are named '{spec}' ({})",
                vms.iter()
                    .map(|v| v.uuid.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            NextStep::PassVmUuid,
        )),
    }
}

/// A typed `xe` failure as the one-line, classified error the user sees.
pub fn xe_fail(what: &str, error: XeError) -> anyhow::Error {
    let kind = match &error {
        XeError::BadArgument { .. } => FailureKind::Vm,
        _ => FailureKind::Xapi,
    };
    fail(kind, format!("{what}: {error}"))
}

/// This host's PUSB for the ready Coral at `path`, among `pusbs`, ignoring
/// records in `distrust` (listed before this run re-enumerated the Coral).
pub fn pusb_at<'p>(
    pusbs: &'p [PusbInfo],
    host: &str,
    path: &str,
    distrust: &[String],
) -> Option<&'p PusbInfo> {
    pusbs.iter().find(|p| {
        p.host == host && p.path == path && p.is_ready_coral() && !distrust.contains(&p.uuid)
    })
}

/// The Coral's PUSB on this host, polled until `timeout` at the pace of
/// XAPI's scan ([`poll_scan`]). `after_reset`: this run just re-enumerated
/// the Coral, so udev's own scans are on their way: the first look waits
/// [`SCAN_FIRST_LOOK`], and `xe pusb-scan` is asked for only if the Coral
/// is still not listed [`SCAN_KICK_AFTER`] later (or half the timeout, if
/// shorter); else after the first look finds nothing. A failed `pusb-scan` is not fatal: udev-triggered
/// scans may list the device anyway. `Ok(None)` only in a dry run.
pub fn wait_for_pusb(
    xe: &XeClient,
    clock: &dyn Clock,
    path: &str,
    distrust: &[String],
    after_reset: bool,
    timeout: Duration,
) -> anyhow::Result<Option<PusbInfo>> {
    let started = clock.now();
    let mut kicked = false;
    let (first_look, kick_after) = if after_reset {
        // A short --scan-timeout still gets its scan asked for, halfway.
        (SCAN_FIRST_LOOK, SCAN_KICK_AFTER.min(timeout / 2))
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    log::debug!("scan wait: waiting for XAPI to list the Coral at {path}");
    let found = poll_scan(clock, timeout, first_look, |since| {
        let pusbs = xe
            .ready_pusbs()
            .map_err(|e| xe_fail("listing this host's Corals in XAPI", e))?;
        if let Some(found) = pusb_at(&pusbs, xe.host_uuid(), path, distrust) {
            log::debug!(
                "XAPI listed the Coral at {path} after {:.1} ms of scan wait",
                clock.now().saturating_sub(started).as_secs_f64() * 1000.0
            );
            return Ok(Some(Some(found.clone())));
        }
        if !kicked && since >= kick_after {
            kicked = true;
            log::info!("XAPI does not list the Coral at {path} yet; asking it to scan USB");
            if let Err(err) = xe.pusb_scan() {
                log::warn!("`xe pusb-scan` failed ({err}); waiting for XAPI's own scan");
            }
            if xe.dry_run() {
                return Ok(Some(None));
            }
        }
        Ok::<_, anyhow::Error>(None)
    })?;
    crate::clock::may_begin(clock, || format!("XAPI listed the Coral at {path}"))?;
    match found {
        Some(found) => Ok(found),
        None => Err(fail(
            FailureKind::Timeout,
            format!(
                "XAPI did not list the Coral at {path} within {} s{}; check /etc/xensource/usb-policy.conf and `xe pusb-list host-uuid={}`",
                timeout.as_secs_f64(),
                if kicked {
                    format!(" after `xe pusb-scan host-uuid={}`", xe.host_uuid())
                } else {
                    String::new()
                },
                xe.host_uuid()
            ),
        )),
    }
}

/// Whether the running VM's QEMU holds the Coral now at `path` (the
/// stateless check of [`crate::usb::qemu_node`], given the VM's `dom-id`).
/// Anything that cannot be read is unknown, never lost.
pub fn guest_node(usb: &dyn UsbBus, xe: &XeClient, vm_uuid: &str, path: &str) -> NodeCheck {
    match xe.dom_id(vm_uuid) {
        Ok(domid) => guest_node_of(usb, domid, path),
        Err(e) => NodeCheck::Unknown(format!("reading its dom-id: {e}")),
    }
}

/// [`guest_node`] for a VM whose `dom-id` was just read (with its record).
pub fn guest_node_of(usb: &dyn UsbBus, domid: Option<u32>, path: &str) -> NodeCheck {
    match domid {
        Some(domid) => usb.qemu_node(path, domid),
        None => NodeCheck::Unknown("the VM has no domain".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;

    #[test]
    fn looks_are_quick_while_the_scan_is_expected_then_back_off_to_the_slow_pace() {
        assert_eq!(scan_pause(Duration::ZERO), SCAN_FAST_POLL);
        assert_eq!(scan_pause(SCAN_FAST_PHASE / 2), SCAN_FAST_POLL);
        let mut last = SCAN_FAST_POLL;
        for ms in (0..20_000).step_by(250) {
            let pause = scan_pause(Duration::from_millis(ms));
            assert!(
                pause >= last && pause <= SCAN_SLOW_POLL,
                "{ms} ms: {pause:?}"
            );
            last = pause;
        }
        assert_eq!(last, SCAN_SLOW_POLL);
    }

    #[test]
    fn the_first_look_waits_and_the_deadline_bounds_the_polling() {
        let clock = VirtualClock::new();
        let mut looks = Vec::new();
        let found = poll_scan(&clock, Duration::from_secs(10), SCAN_FIRST_LOOK, |since| {
            looks.push((clock.now(), since));
            Ok::<_, ()>(None::<()>)
        })
        .unwrap();
        assert_eq!(found, None);
        assert_eq!(looks[0], (SCAN_FIRST_LOOK, Duration::ZERO));
        assert_eq!(looks[1].0 - looks[0].0, SCAN_FAST_POLL);
        assert!(clock.now() >= Duration::from_secs(10));
        assert!(clock.now() <= Duration::from_secs(10) + SCAN_SLOW_POLL);
    }
}

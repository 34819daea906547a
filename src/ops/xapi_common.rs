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

/// How often `pusb-list` is asked again while XAPI's scan runs.
pub const SCAN_POLL_INTERVAL: Duration = Duration::from_millis(500);

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
    let mut vms = xe
        .find_vms(spec)
        .map_err(|e| xe_fail("looking up the VM", e))?;
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

/// The Coral's PUSB on this host, polled until `timeout` (XAPI's scan is
/// asynchronous). `after_reset`: this run just re-enumerated the Coral, so
/// udev's own scans are on their way: pause before the first look and ask
/// for a scan only after two looks found nothing (else after one). A
/// failed `pusb-scan` is not fatal: udev-triggered scans may list the
/// device anyway. `Ok(None)` only in a dry run.
pub fn wait_for_pusb(
    xe: &XeClient,
    clock: &dyn Clock,
    path: &str,
    distrust: &[String],
    after_reset: bool,
    timeout: Duration,
) -> anyhow::Result<Option<PusbInfo>> {
    let started = clock.now();
    let timeout = crate::clock::capped(clock, timeout);
    let deadline = crate::clock::deadline_after(clock, timeout);
    let mut kicked = false;
    let mut misses = 0;
    let kick_after = if after_reset { 2 } else { 1 };
    log::debug!("scan wait: waiting for XAPI to list the Coral at {path}");
    if after_reset {
        clock.sleep(SCAN_POLL_INTERVAL.min(timeout));
    }
    loop {
        let pusbs = xe
            .ready_pusbs()
            .map_err(|e| xe_fail("listing this host's Corals in XAPI", e))?;
        if let Some(found) = pusb_at(&pusbs, xe.host_uuid(), path, distrust) {
            log::debug!(
                "XAPI listed the Coral at {path} after {:.1} ms of scan wait",
                clock.now().saturating_sub(started).as_secs_f64() * 1000.0
            );
            return Ok(Some(found.clone()));
        }
        misses += 1;
        if !kicked && misses >= kick_after {
            kicked = true;
            log::info!("XAPI does not list the Coral at {path} yet; asking it to scan USB");
            if let Err(err) = xe.pusb_scan() {
                log::warn!("`xe pusb-scan` failed ({err}); waiting for XAPI's own scan");
            }
            if xe.dry_run() {
                return Ok(None);
            }
        }
        let now = clock.now();
        if now >= deadline {
            return Err(fail(
                FailureKind::Timeout,
                format!(
                    "XAPI did not list the Coral at {path} within {} s after `xe pusb-scan host-uuid={}`; check /etc/xensource/usb-policy.conf and `xe pusb-list host-uuid={}`",
                    timeout.as_secs_f64(),
                    xe.host_uuid(),
                    xe.host_uuid()
                ),
            ));
        }
        // A wait before a step: a stop ends it (nothing was changed yet).
        crate::clock::may_begin(clock, || format!("XAPI listed the Coral at {path}"))?;
        clock.sleep(SCAN_POLL_INTERVAL.min(deadline.saturating_sub(now)));
    }
}

/// Whether the running VM's QEMU holds the Coral now at `path` (the
/// stateless check of [`crate::usb::qemu_node`], given the VM's `dom-id`).
/// Anything that cannot be read is unknown, never lost.
pub fn guest_node(usb: &dyn UsbBus, xe: &XeClient, vm_uuid: &str, path: &str) -> NodeCheck {
    match xe.dom_id(vm_uuid) {
        Ok(Some(domid)) => usb.qemu_node(path, domid),
        Ok(None) => NodeCheck::Unknown("the VM has no domain".into()),
        Err(e) => NodeCheck::Unknown(format!("reading its dom-id: {e}")),
    }
}

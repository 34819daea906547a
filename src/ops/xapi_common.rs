//! Steps `attach`, `detach` and `status` share: the ready Coral on this
//! host's USB, the VM named by `--vm`, and the Coral's PUSB in XAPI.

use super::init::select_coral;
use crate::clock::{poll_until, Clock};
use crate::error::{fail, FailureKind};
use crate::usb::{CoralDevice, CoralState, UsbBus};
use crate::xe::client::{PusbInfo, VmInfo, XeClient};
use std::time::Duration;

/// How often `pusb-list` is asked again while XAPI's scan runs.
const SCAN_POLL_INTERVAL: Duration = Duration::from_millis(250);

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
        return Err(fail(
            FailureKind::NoCoral,
            format!(
                "the Coral at {} is not initialized (1a6e:089a); run `coral init` (or `coral up --vm …`) first",
                coral.path
            ),
        ));
    }
    Ok(coral)
}

/// The one VM whose uuid or exact name-label is `spec`.
pub fn resolve_vm(xe: &XeClient, spec: &str) -> anyhow::Result<VmInfo> {
    if spec.trim().is_empty() {
        return Err(fail(
            FailureKind::Vm,
            "--vm is empty; give a VM uuid or its exact name-label",
        ));
    }
    let mut vms = xe.find_vms(spec)?;
    match vms.len() {
        0 => Err(fail(
            FailureKind::Vm,
            format!("VM '{spec}' not found on this pool; `xe vm-list params=uuid,name-label` shows the names (exact match, templates and snapshots excluded)"),
        )),
        1 => Ok(vms.remove(0)),
        n => Err(fail(
            FailureKind::Vm,
            format!(
                "{n} VMs are named '{spec}' ({}); pass the uuid of the one you mean with --vm",
                vms.iter().map(|v| v.uuid.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// The Coral's PUSB on this host, if XAPI lists it now.
pub fn find_pusb(xe: &XeClient, coral: &CoralDevice) -> anyhow::Result<Option<PusbInfo>> {
    let path = coral.path.to_string();
    Ok(xe.ready_pusbs()?.into_iter().find(|p| p.path == path))
}

/// The Coral's PUSB, asking XAPI to scan once and polling until `timeout`
/// when it is not listed yet (XAPI's scan is asynchronous). `None` only in
/// a dry run, where the scan is planned, not run.
pub fn wait_for_pusb(
    xe: &XeClient,
    clock: &dyn Clock,
    coral: &CoralDevice,
    timeout: Duration,
) -> anyhow::Result<Option<PusbInfo>> {
    if let Some(pusb) = find_pusb(xe, coral)? {
        return Ok(Some(pusb));
    }
    log::info!(
        "XAPI does not list the Coral at {} yet; asking it to scan USB",
        coral.path
    );
    xe.pusb_scan()?;
    if xe.dry_run() {
        return Ok(None);
    }
    let started = clock.now();
    let found = poll_until(clock, timeout, SCAN_POLL_INTERVAL, || find_pusb(xe, coral))?;
    if found.is_some() {
        log::debug!(
            "XAPI listed the Coral at {} after {:.1} ms of scan wait",
            coral.path,
            (clock.now() - started).as_secs_f64() * 1000.0
        );
    }
    found.map(Some).ok_or_else(|| {
        fail(
            FailureKind::Timeout,
            format!(
                "XAPI did not list the Coral at {} within {} s after `xe pusb-scan host-uuid={}`; check /etc/xensource/usb-policy.conf and `xe pusb-list host-uuid={}`",
                coral.path,
                timeout.as_secs_f64(),
                xe.host_uuid(),
                xe.host_uuid()
            ),
        )
    })
}

//! `coral detach`: unplug (running VM) and destroy the Coral's VUSB.

use super::xapi_common::{pusb_at, ready_coral, resolve_vm, xe_fail};
use crate::usb::UsbBus;
use crate::xe::client::XeClient;
use crate::xe::short;

/// What `detach` should do.
#[derive(Clone, Debug)]
pub struct DetachOptions {
    /// VM uuid or exact name-label.
    pub vm: String,
    /// `--device PATH`.
    pub device: Option<String>,
}

/// What `detach` did.
#[derive(Clone, Debug)]
pub struct DetachReport {
    /// The line to print.
    pub line: String,
    /// The VM's uuid (its mapping is paused, so `coral watch` leaves it alone).
    pub vm_uuid: String,
}

/// Detach; returns what was done.
pub fn detach(
    usb: &dyn UsbBus,
    xe: &XeClient,
    opts: &DetachOptions,
) -> anyhow::Result<DetachReport> {
    let coral = ready_coral(usb, opts.device.as_deref())?;
    let vm = resolve_vm(xe, &opts.vm)?;
    let label = &vm.label;
    let path = coral.path.to_string();
    let pusbs = xe
        .ready_pusbs()
        .map_err(|e| xe_fail("listing this host's Corals in XAPI", e))?;
    let report = |line: String| DetachReport {
        line,
        vm_uuid: vm.uuid().to_string(),
    };
    let Some(pusb) = pusb_at(&pusbs, xe.host_uuid(), &path, &[]) else {
        return Ok(report(format!(
            "XAPI lists no Coral at {path}; nothing to detach from {label}"
        )));
    };
    let vusbs = xe
        .vusbs_of_group(&pusb.group)
        .map_err(|e| xe_fail("listing the Coral's VUSBs", e))?;
    let Some(vusb) = vusbs.iter().find(|v| v.vm_uuid == vm.uuid()) else {
        return Ok(report(format!(
            "the Coral at {path} is not passed through to {label}; nothing to do"
        )));
    };
    if vusb.attached {
        xe.vusb_unplug(&vusb.uuid)
            .map_err(|e| xe_fail("unplugging the VUSB", e))?;
        if !xe.dry_run() {
            log::info!("unplugged the Coral from running {label}");
        }
    }
    xe.vusb_destroy(&vusb.uuid)
        .map_err(|e| xe_fail("destroying the VUSB", e))?;
    let line = if xe.dry_run() {
        format!(
            "would remove VUSB {}: the Coral at {path} would no longer be passed through to {label}",
            short(&vusb.uuid),
        )
    } else {
        format!(
            "removed VUSB {}: the Coral at {path} is no longer passed through to {label}",
            short(&vusb.uuid),
        )
    };
    log::info!("{line}");
    Ok(report(line))
}

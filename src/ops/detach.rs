//! `coral detach`: unplug (running VM) and destroy the Coral's VUSB.

use super::attach::short;
use super::xapi_common::{find_pusb, ready_coral, resolve_vm};
use crate::usb::UsbBus;
use crate::xe::client::XeClient;

/// What `detach` should do.
#[derive(Clone, Debug)]
pub struct DetachOptions {
    /// VM uuid or exact name-label.
    pub vm: String,
    /// `--device PATH`.
    pub device: Option<String>,
}

/// Detach; returns the line(s) to print.
pub fn detach(usb: &dyn UsbBus, xe: &XeClient, opts: &DetachOptions) -> anyhow::Result<String> {
    let coral = ready_coral(usb, opts.device.as_deref())?;
    let vm = resolve_vm(xe, &opts.vm)?;
    let label = format!("VM '{}'", vm.name);
    let Some(pusb) = find_pusb(xe, &coral)? else {
        return Ok(format!(
            "XAPI lists no Coral at {}; nothing to detach from {label}",
            coral.path
        ));
    };
    let vusbs = xe.vusbs_of_group(&pusb.group)?;
    let Some(vusb) = vusbs.iter().find(|v| v.vm_uuid == vm.uuid) else {
        return Ok(format!(
            "the Coral at {} is not passed through to {label}; nothing to do",
            coral.path
        ));
    };
    if vusb.attached {
        xe.vusb_unplug(&vusb.uuid)?;
        log::info!("unplugged the Coral from running {label}");
    }
    xe.vusb_destroy(&vusb.uuid)?;
    let line = format!(
        "removed VUSB {} : the Coral at {} is no longer passed through to {label}",
        short(&vusb.uuid),
        coral.path
    );
    log::info!("{line}");
    Ok(line)
}

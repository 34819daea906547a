//! `coral detach`: unplug (running VM) and destroy the Coral's VUSB.
//!
//! CONTRACT (bodies to be written).

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
    let _ = (usb, xe, opts);
    todo!("ops::detach::detach")
}

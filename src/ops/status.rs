//! `coral status`: per Coral, USB state and its XAPI objects.
//!
//! CONTRACT (bodies to be written).

use crate::usb::UsbBus;
use crate::xe::client::XeClient;
use serde::Serialize;

/// The whole status (JSON schema documented in README.md).
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Schema version, 1.
    pub schema: u32,
}

impl StatusReport {
    /// The table for an 80-column terminal.
    pub fn render_table(&self) -> String {
        todo!("ops::status::render_table")
    }
}

/// Gather the status; without `xe` (not a dom0) only the USB side.
pub fn status(usb: &dyn UsbBus, xe: Option<&XeClient>) -> anyhow::Result<StatusReport> {
    let _ = (usb, xe);
    todo!("ops::status::status")
}

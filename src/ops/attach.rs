//! `coral attach`: make XAPI pass the ready Coral through to a VM.
//!
//! CONTRACT (bodies to be written).

use crate::clock::Clock;
use crate::usb::UsbBus;
use crate::xe::client::XeClient;
use std::fmt;
use std::time::Duration;

/// What `attach` should do.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// VM uuid or exact name-label.
    pub vm: String,
    /// `--device PATH` (the ready Coral's path).
    pub device: Option<String>,
    /// `--start`: start the VM if halted.
    pub start: bool,
    /// `--restart`: clean shutdown + start if running without the Coral.
    pub restart: bool,
    /// `--force-shutdown`: hard power-off when the clean shutdown times out.
    pub force_shutdown: bool,
    /// Deadline for a clean shutdown.
    pub shutdown_timeout: Duration,
    /// Deadline for XAPI to list the ready Coral.
    pub scan_timeout: Duration,
}

/// What `attach` did, in plain words (Display: one line per fact).
#[derive(Clone, Debug, Default)]
pub struct AttachReport {
    /// Lines describing what was done / what is still needed.
    pub lines: Vec<String>,
    /// True when something was changed in XAPI or the VM's power state.
    pub changed: bool,
}

impl fmt::Display for AttachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join("\n"))
    }
}

/// Attach the ready Coral on this host to `opts.vm`, per the rules of the issue.
pub fn attach(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    opts: &AttachOptions,
) -> anyhow::Result<AttachReport> {
    let _ = (usb, xe, clock, opts);
    todo!("ops::attach::attach")
}

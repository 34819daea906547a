//! `coral init`: find uninitialized Corals, upload the firmware over DFU,
//! reset, and wait until each comes back as `18d1:9302`.
//!
//! CONTRACT (bodies to be written): other modules call only what is here.

use crate::clock::Clock;
use crate::firmware::FirmwareImage;
use crate::usb::{CoralDevice, UsbBus};
use std::time::Duration;

/// Default wait for the Coral to come back after the reset (`--timeout`).
pub const DEFAULT_REPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// What `init` should do.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// `--device PATH`: only this Coral (sysfs port path, e.g. `1-4`).
    pub device: Option<String>,
    /// `--force`: re-flash a ready Coral (DFU_DETACH, reset, then the normal path).
    pub force: bool,
    /// How long to wait for `18d1:9302` after the reset.
    pub replug_timeout: Duration,
}

/// Counts and figures of one firmware download (for output and benchmarks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DownloadSummary {
    /// Image bytes sent.
    pub bytes: usize,
    /// DNLOAD requests incl. the zero-length one.
    pub dnload_requests: u32,
    /// GETSTATUS requests.
    pub getstatus_requests: u32,
    /// UPLOAD requests (read-back).
    pub upload_requests: u32,
    /// Any other class request (CLRSTATUS, ABORT, DETACH).
    pub other_requests: u32,
    /// Block size used (wTransferSize).
    pub transfer_size: u16,
}

/// What happened to one Coral.
#[derive(Clone, Debug)]
pub enum InitOutcome {
    /// It was already `18d1:9302`; nothing was written to it.
    AlreadyReady {
        /// The ready device.
        device: CoralDevice,
    },
    /// The firmware was uploaded and it came back ready.
    Initialized {
        /// The boot loader it was.
        before: CoralDevice,
        /// The ready device it became (its own path: the bus may differ).
        after: CoralDevice,
        /// The download's figures.
        summary: DownloadSummary,
        /// From opening the device to seeing it ready.
        elapsed: Duration,
    },
}

impl InitOutcome {
    /// The ready device at the end.
    pub fn ready_device(&self) -> &CoralDevice {
        match self {
            InitOutcome::AlreadyReady { device } => device,
            InitOutcome::Initialized { after, .. } => after,
        }
    }
}

/// Initialize every uninitialized Coral (or only `--device`); `load_firmware`
/// is called at most once, only when something needs it, and before any USB
/// traffic to a device. No Coral at all → `FailureKind::NoCoral`.
pub fn init(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &InitOptions,
) -> anyhow::Result<Vec<InitOutcome>> {
    let _ = (usb, clock, load_firmware, opts);
    todo!("ops::init::init")
}

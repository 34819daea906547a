//! `coral init`: find uninitialized Corals, upload the firmware over DFU,
//! reset, and wait until each comes back as `18d1:9302`.

use crate::clock::{poll_until, Clock};
use crate::dfu::{self, DfuError, Download};
use crate::error::{fail, FailureKind};
use crate::firmware::FirmwareImage;
use crate::usb::{select_one, CoralDevice, CoralState, ResetOutcome, UsbBus, UsbError};
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

/// How often to look for the device after a reset.
const REPLUG_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Initialize every uninitialized Coral (or only `--device`); `load_firmware`
/// is called at most once, only when something needs it, and before any USB
/// traffic to a device. No Coral at all → `FailureKind::NoCoral`.
pub fn init(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &InitOptions,
) -> anyhow::Result<Vec<InitOutcome>> {
    let corals = usb
        .list_corals()
        .map_err(|e| usb_failure("listing USB devices", e))?;
    let targets = match &opts.device {
        Some(_) => vec![select_one(&corals, opts.device.as_deref())?],
        None if corals.is_empty() => vec![select_one(&corals, None)?],
        None => corals,
    };
    let needing = targets
        .iter()
        .filter(|c| opts.force || c.state == CoralState::Uninitialized)
        .count();
    if opts.device.is_none() && targets.len() > 1 {
        log::info!("found {} Corals; {needing} need firmware", targets.len());
    }

    let mut image = None;
    let mut outcomes = Vec::new();
    for coral in targets {
        if coral.state == CoralState::Ready && !opts.force {
            log::info!(
                "Coral at {} is ready (18d1:9302); nothing to do",
                coral.path
            );
            outcomes.push(InitOutcome::AlreadyReady { device: coral });
            continue;
        }
        if image.is_none() {
            image = Some(load_firmware()?);
        }
        let image = image.as_ref().expect("loaded above");
        outcomes.push(initialize(usb, clock, image, coral, opts.replug_timeout)?);
    }
    Ok(outcomes)
}

/// The procedure for one Coral: (detach a ready one,) download, reset, wait.
fn initialize(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    image: &FirmwareImage,
    coral: CoralDevice,
    replug_timeout: Duration,
) -> anyhow::Result<InitOutcome> {
    let started = clock.now();
    let before = match coral.state {
        CoralState::Uninitialized => coral,
        CoralState::Ready => back_to_bootloader(usb, clock, &coral, replug_timeout)?,
    };
    log::info!(
        "found uninitialized Coral at {} (1a6e:089a, device {:03})",
        before.path,
        before.address
    );

    let mut transport = usb.open(&before).map_err(|e| open_failure(&before, e))?;
    let summary = Download::open(transport.as_mut(), clock)
        .and_then(|download| download.run(&image.bytes))
        .map_err(|e| dfu_failure(&before, e))?;
    match transport.reset() {
        Ok(outcome) => log::info!(
            "reset: {}",
            match outcome {
                ResetOutcome::Reenumerating => "device left the bus to re-enumerate",
                ResetOutcome::SameDevice => "device reset",
            }
        ),
        Err(e) => {
            return Err(usb_failure(
                &format!("resetting the Coral at {}", before.path),
                e,
            ))
        }
    }

    let after = wait_for(usb, clock, &before, CoralState::Ready, replug_timeout)?;
    let elapsed = clock.now() - started;
    log::info!(
        "ready at {} after {:.1} s",
        after.path,
        elapsed.as_secs_f64()
    );
    Ok(InitOutcome::Initialized {
        before,
        after,
        summary,
        elapsed,
    })
}

/// `--force` on a ready Coral: DFU_DETACH, reset, wait for the boot loader.
fn back_to_bootloader(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    coral: &CoralDevice,
    timeout: Duration,
) -> anyhow::Result<CoralDevice> {
    log::info!(
        "--force: sending the ready Coral at {} back to its boot loader",
        coral.path
    );
    let mut transport = usb.open(coral).map_err(|e| open_failure(coral, e))?;
    dfu::detach(transport.as_mut()).map_err(|e| dfu_failure(coral, e))?;
    transport
        .reset()
        .map_err(|e| usb_failure(&format!("resetting the Coral at {}", coral.path), e))?;
    wait_for(usb, clock, coral, CoralState::Uninitialized, timeout)
}

/// Poll fresh listings until a Coral in `state` shows up on `from`'s port
/// chain (the bus may differ: a USB 2 boot loader at `1-4` comes back on the
/// SuperSpeed bus as `2-4`).
fn wait_for(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    from: &CoralDevice,
    state: CoralState,
    timeout: Duration,
) -> anyhow::Result<CoralDevice> {
    let mut wrong_identity = None;
    let found = poll_until(clock, timeout, REPLUG_POLL_INTERVAL, || {
        let corals = match usb.list_corals() {
            Ok(corals) => corals,
            // libusb can fail to start while the bus changes: look again.
            Err(_) => return Ok::<_, anyhow::Error>(None),
        };
        let on_port = |c: &&CoralDevice| c.path.same_port_chain(&from.path);
        let appeared = |c: &&CoralDevice| c.address != from.address || c.path != from.path;
        if let Some(c) = corals.iter().filter(on_port).find(|c| c.state == state) {
            if state == CoralState::Ready || appeared(&c) {
                return Ok(Some(c.clone()));
            }
        }
        wrong_identity = corals
            .iter()
            .filter(on_port)
            .find(|c| c.state != state && appeared(c))
            .cloned();
        Ok(None)
    })?;
    match (found, wrong_identity) {
        (Some(device), _) => Ok(device),
        (None, Some(again)) if state == CoralState::Ready => Err(fail(
            FailureKind::Usb,
            format!(
                "the Coral at {} came back as 1a6e:089a again after the firmware upload (device {:03}); unplug and replug it, then rerun `coral init`",
                again.path, again.address
            ),
        )),
        (None, _) => Err(fail(
            FailureKind::Timeout,
            format!(
                "the Coral at {} did not come back as {} within {} s; unplug and replug it, then rerun `coral init`",
                from.path,
                state.id(),
                timeout.as_secs_f64()
            ),
        )),
    }
}

fn open_failure(coral: &CoralDevice, error: UsbError) -> anyhow::Error {
    match error {
        UsbError::Access => fail(
            FailureKind::Usb,
            format!("permission denied opening the Coral at {}: run coral as root", coral.path),
        ),
        UsbError::Busy => fail(
            FailureKind::Usb,
            format!(
                "the Coral at {} is in use (passed through to a VM?); see `coral status`, then `coral detach --vm <vm>`",
                coral.path
            ),
        ),
        other => usb_failure(&format!("opening the Coral at {}", coral.path), other),
    }
}

fn dfu_failure(coral: &CoralDevice, error: DfuError) -> anyhow::Error {
    let next = "rerun `coral init` (replug the Coral if it keeps failing)";
    let message = match &error {
        DfuError::Usb {
            step,
            error: UsbError::NoDevice,
        } => format!(
            "the Coral at {} disappeared during the firmware upload ({step}); {next}",
            coral.path
        ),
        DfuError::Usb {
            error: UsbError::Busy,
            ..
        } => {
            return open_failure(coral, UsbError::Busy);
        }
        _ => format!(
            "firmware upload to the Coral at {} failed: {error}; {next}",
            coral.path
        ),
    };
    fail(FailureKind::Usb, message)
}

fn usb_failure(what: &str, error: UsbError) -> anyhow::Error {
    fail(
        FailureKind::Usb,
        format!("{what}: {error}; rerun with -vv for every USB request"),
    )
}

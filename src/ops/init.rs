//! `coral init`: find uninitialized Corals, upload the firmware over DFU,
//! reset, and wait until each comes back as `18d1:9302` at its own physical
//! port (coral-dfu.md, "Two identities" and the bus/peer-port section).

use crate::clock::{poll_until, Clock};
use crate::dfu::{self, DfuError, Download};
use crate::error::{fail, fail_then, FailureKind, Flag, NextStep};
use crate::firmware::FirmwareImage;
use crate::usb::{
    select_one, CoralDevice, CoralState, ResetOutcome, SelectError, UsbBus, UsbError,
};
use std::time::Duration;

pub use crate::dfu::DownloadSummary;

/// Default wait for the Coral to come back after the reset (`--timeout`).
///
/// Re-enumeration time is not published; Google's runtime sleeps 4 s after
/// the reset and then tries once a second up to 25 times, so it tolerates
/// about 29 s. 30 s covers that; coral polls every 10 ms, so it returns
/// within milliseconds of the ready device appearing, however long the
/// deadline.
pub const DEFAULT_REPLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// Default wait of `coral init` for a Coral to appear: none, it fails at once.
pub const DEFAULT_INIT_WAIT_DEVICE: Duration = Duration::ZERO;

/// Default wait of `coral up` (the boot service) for a Coral to appear at
/// all: a Coral behind a hub, or one slow to power up, may
/// enumerate after coral has started. Every second of it delays the host's
/// VM auto-start when no Coral is plugged in, so it is kept short.
pub const DEFAULT_UP_WAIT_DEVICE: Duration = Duration::from_secs(20);

/// What `init` should do.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// `--device PATH`: only this Coral (sysfs port path, e.g. `1-4`).
    pub device: Option<String>,
    /// `--force`: re-flash a ready Coral (DFU_DETACH, reset, then the normal path).
    pub force: bool,
    /// How long to wait for `18d1:9302` after the reset.
    pub replug_timeout: Duration,
    /// How long to wait for a Coral to appear at all (zero: answer at once).
    pub wait_device: Duration,
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

/// How often to look for a device (after a reset, or one yet to appear).
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The one Coral `device` names (or the only one), worded for the user:
/// the typed [`SelectError`] gets the flag to use and the next step.
pub fn select_coral(corals: &[CoralDevice], device: Option<&str>) -> anyhow::Result<CoralDevice> {
    select_one(corals, device).map_err(|e| select_failure(&e, device, Duration::ZERO))
}

fn select_failure(error: &SelectError, device: Option<&str>, waited: Duration) -> anyhow::Error {
    let waited = if waited.is_zero() {
        String::new()
    } else {
        format!(" (waited {} s)", waited.as_secs_f64())
    };
    let kind = FailureKind::NoCoral;
    match error {
        SelectError::BadPath(e) => fail_then(
            kind,
            format!("{} {:?}: {e}", Flag::Device, device.unwrap_or("")),
            NextStep::StatusShowsPaths,
        ),
        SelectError::NoCoral => fail(
            kind,
            format!("{error}{waited}; is it plugged in? check `lsusb`"),
        ),
        SelectError::NoneAt { present, .. } if present.is_empty() => fail(
            kind,
            format!("{error}{waited}; check `lsusb` for 1a6e:089a or 18d1:9302"),
        ),
        SelectError::NoneAt { .. } => {
            fail_then(kind, format!("{error}{waited}"), NextStep::PassOneOfThose)
        }
        SelectError::Several(_) => fail_then(kind, error.to_string(), NextStep::ChooseDevice),
    }
}

/// Poll until the Coral `device` names (or the only Coral) is on the bus,
/// for at most `timeout` (zero: look once). A Coral that arrives late (a
/// hub still resetting, a slow power-up) is found within [`POLL_INTERVAL`];
/// several Corals without `device`, or a bad path, fail at once.
pub fn wait_for_coral(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    device: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<CoralDevice> {
    let pick = |corals: &[CoralDevice]| select_one(corals, device).map(|c| vec![c]);
    wait_for_corals(usb, clock, device, timeout, &pick).map(|(_, mut found)| found.remove(0))
}

/// Chooses the Corals to act on from a listing.
type Pick<'a> = dyn Fn(&[CoralDevice]) -> Result<Vec<CoralDevice>, SelectError> + 'a;

/// Poll fresh listings until `pick` finds what it wants (see
/// [`wait_for_coral`]); returns that listing and what was picked.
fn wait_for_corals(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    device: Option<&str>,
    timeout: Duration,
    pick: &Pick<'_>,
) -> anyhow::Result<(Vec<CoralDevice>, Vec<CoralDevice>)> {
    let started = clock.now();
    let mut last: Option<Result<SelectError, UsbError>> = None;
    let mut said = false;
    let found = poll_until(clock, timeout, POLL_INTERVAL, || {
        match usb.list_corals() {
            Ok(corals) => match pick(&corals) {
                Ok(found) => return Ok(Some((corals, found))),
                Err(e) if e.may_resolve_later() => last = Some(Ok(e)),
                Err(e) => return Err(select_failure(&e, device, Duration::ZERO)),
            },
            // libusb can fail to start while the bus changes: look again.
            Err(e) => last = Some(Err(e)),
        }
        if !said && !timeout.is_zero() {
            said = true;
            log::info!(
                "no Coral{} yet; waiting up to {} s for one to appear",
                device.map(|d| format!(" at {d}")).unwrap_or_default(),
                timeout.as_secs_f64()
            );
        }
        Ok(None)
    })?;
    match (found, last) {
        (Some(found), _) => {
            if said {
                log::info!(
                    "a Coral appeared after {:.1} s",
                    (clock.now() - started).as_secs_f64()
                );
            }
            Ok(found)
        }
        (None, Some(Ok(e))) => Err(select_failure(&e, device, timeout)),
        (None, Some(Err(e))) => Err(usb_failure("listing USB devices", e)),
        (None, None) => Err(select_failure(&SelectError::NoCoral, device, timeout)),
    }
}

/// Initialize every uninitialized Coral (or only `--device`); `load_firmware`
/// is called at most once, only when something needs it, and before any USB
/// traffic to a device. No Coral at all (within `wait_device`) →
/// `FailureKind::NoCoral`.
///
/// Every Coral is downloaded and reset first, then all are waited for
/// together (each re-enumeration takes seconds), each paired with its own
/// boot loader by physical port.
pub fn init(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &InitOptions,
) -> anyhow::Result<Vec<InitOutcome>> {
    init_with(usb, clock, load_firmware, opts, &mut || Ok(()))
}

/// [`init`], with `before_reset` run after each verified download, before
/// that Coral is reset: when it fails, the Coral is not reset (it stays the
/// boot loader it was, nothing else changes; a rerun downloads again) and
/// its error is the outcome.
pub fn init_with(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &InitOptions,
    before_reset: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<InitOutcome>> {
    let device = opts.device.as_deref();
    let all = |corals: &[CoralDevice]| match device {
        Some(_) => select_one(corals, device).map(|c| vec![c]),
        None if corals.is_empty() => Err(SelectError::NoCoral),
        None => Ok(corals.to_vec()),
    };
    // Everything on the bus now is never "the Coral that came back" (an
    // unrelated ready Coral elsewhere, say).
    let (mut seen, targets) = wait_for_corals(usb, clock, device, opts.wait_device, &all)?;
    let needing = targets
        .iter()
        .filter(|c| opts.force || c.state == CoralState::Uninitialized)
        .count();
    if device.is_none() && targets.len() > 1 {
        log::info!("found {} Corals; {needing} need firmware", targets.len());
    }

    let mut image = None;
    let mut outcomes = Vec::new();
    let mut pending = Vec::new();
    let mut failure = None;
    for coral in targets {
        if coral.state == CoralState::Ready && !opts.force {
            log::info!(
                "Coral at {} is ready (18d1:9302); nothing to do",
                coral.path
            );
            outcomes.push(Some(InitOutcome::AlreadyReady { device: coral }));
            continue;
        }
        if image.is_none() {
            match load_firmware() {
                Ok(loaded) => image = Some(loaded),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let image = image.as_ref().expect("loaded above");
        match flash(
            usb,
            clock,
            image,
            coral,
            &mut seen,
            opts.replug_timeout,
            before_reset,
        ) {
            Ok(flashed) => {
                pending.push((outcomes.len(), flashed));
                outcomes.push(None);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }

    // Wait even when a later Coral failed: the ones already reset come back.
    let waits: Vec<Waiting> = pending.iter().map(|(_, f)| f.waiting.clone()).collect();
    let results = wait_for_identity(usb, clock, &seen, waits, CoralState::Ready);
    for ((slot, flashed), result) in pending.into_iter().zip(results) {
        match result {
            Ok(after) => {
                let elapsed = clock.now() - flashed.started;
                log::info!(
                    "ready at {} after {:.1} s",
                    after.path,
                    elapsed.as_secs_f64()
                );
                outcomes[slot] = Some(InitOutcome::Initialized {
                    before: flashed.waiting.from,
                    after,
                    summary: flashed.summary,
                    elapsed,
                });
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(outcomes.into_iter().flatten().collect()),
    }
}

/// A reset device being waited for.
#[derive(Clone, Debug)]
struct Waiting {
    /// What it was before the reset.
    from: CoralDevice,
    /// When the wait ends.
    deadline: Duration,
    /// The wait's length, for the message.
    timeout: Duration,
    /// A reset that reported an error other than "device gone".
    reset_error: Option<UsbError>,
}

/// A Coral whose verified download is done and which was reset.
struct Flashed {
    waiting: Waiting,
    summary: DownloadSummary,
    started: Duration,
}

/// For one Coral: (detach a ready one,) download, verify, reset.
fn flash(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    image: &FirmwareImage,
    coral: CoralDevice,
    seen: &mut Vec<CoralDevice>,
    replug_timeout: Duration,
    before_reset: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Flashed> {
    let started = clock.now();
    let before = match coral.state {
        CoralState::Uninitialized => coral,
        CoralState::Ready => {
            let bootloader = back_to_bootloader(usb, clock, &coral, seen, replug_timeout)?;
            seen.push(bootloader.clone());
            bootloader
        }
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
    before_reset()?;
    let reset_error = match transport.reset() {
        Ok(ResetOutcome::Reenumerating) => {
            log::info!("reset: device left the bus to re-enumerate");
            None
        }
        Ok(ResetOutcome::SameDevice) => {
            log::info!("reset: device reset; waiting for it to re-enumerate");
            None
        }
        // The firmware is verified: whatever the reset reported, the device
        // may well be re-enumerating (as fwupd's wait-for-replug assumes).
        Err(e) => {
            log::warn!(
                "resetting the Coral at {} reported: {e}; the firmware is verified, waiting for the device anyway",
                before.path
            );
            Some(e)
        }
    };
    Ok(Flashed {
        waiting: Waiting {
            from: before,
            deadline: crate::clock::deadline_after(clock, replug_timeout),
            timeout: replug_timeout,
            reset_error,
        },
        summary,
        started,
    })
}

/// `--force` on a ready Coral: DFU_DETACH, reset, wait for the boot loader.
fn back_to_bootloader(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    coral: &CoralDevice,
    seen: &[CoralDevice],
    timeout: Duration,
) -> anyhow::Result<CoralDevice> {
    log::info!(
        "--force: sending the ready Coral at {} back to its boot loader",
        coral.path
    );
    let mut transport = usb.open(coral).map_err(|e| open_failure(coral, e))?;
    dfu::detach(transport.as_mut()).map_err(|e| dfu_failure(coral, e))?;
    let reset_error = transport.reset().err();
    let waiting = Waiting {
        from: coral.clone(),
        deadline: crate::clock::deadline_after(clock, timeout),
        timeout,
        reset_error,
    };
    wait_for_identity(usb, clock, seen, vec![waiting], CoralState::Uninitialized).remove(0)
}

/// Poll fresh listings until each reset device is back: a Coral that was not
/// there before (`seen`) at the same physical port (port chain or its peer).
/// In `want` it is done; in the other identity it failed at once (a boot
/// loader that comes back as 1a6e:089a refused the image).
fn wait_for_identity(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    seen: &[CoralDevice],
    waits: Vec<Waiting>,
    want: CoralState,
) -> Vec<anyhow::Result<CoralDevice>> {
    let mut results: Vec<Option<anyhow::Result<CoralDevice>>> =
        waits.iter().map(|_| None).collect();
    let is_new = |c: &CoralDevice| !seen.iter().any(|s| s.same_enumeration(c));
    loop {
        if let Ok(corals) = usb.list_corals() {
            for (wait, result) in waits.iter().zip(results.iter_mut()) {
                if result.is_some() {
                    continue;
                }
                let back = corals
                    .iter()
                    .filter(|c| is_new(c) && c.same_physical_port(&wait.from))
                    .find(|c| c.state == want)
                    .or_else(|| {
                        corals
                            .iter()
                            .find(|c| is_new(c) && c.same_physical_port(&wait.from))
                    });
                if let Some(back) = back {
                    *result = Some(if back.state == want {
                        Ok(back.clone())
                    } else {
                        Err(wrong_identity(&wait.from, back))
                    });
                }
            }
        }
        let now = clock.now();
        for (wait, result) in waits.iter().zip(results.iter_mut()) {
            // A wait before a step: a stop (SIGTERM) ends it too.
            if result.is_none() && (now >= wait.deadline || clock.stop_requested()) {
                *result = Some(Err(not_back(wait, want)));
            }
        }
        let next_deadline = waits
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(w, _)| w.deadline)
            .min();
        match next_deadline {
            None => break,
            Some(deadline) => clock.sleep(POLL_INTERVAL.min(deadline.saturating_sub(now))),
        }
    }
    results.into_iter().flatten().collect()
}

fn wrong_identity(from: &CoralDevice, back: &CoralDevice) -> anyhow::Error {
    match back.state {
        CoralState::Uninitialized => fail_then(
            FailureKind::Usb,
            format!(
                "the Coral at {} came back as 1a6e:089a again after the firmware upload (at {}, device {:03}): its boot loader did not take the image",
                from.path, back.path, back.address
            ),
            NextStep::ReplugThenInit,
        ),
        CoralState::Ready => fail_then(
            FailureKind::Usb,
            format!(
                "the Coral at {} came back as 18d1:9302 instead of its boot loader (at {})",
                from.path, back.path
            ),
            NextStep::InitForceOrReplug,
        ),
    }
}

fn not_back(wait: &Waiting, want: CoralState) -> anyhow::Error {
    let reset = wait
        .reset_error
        .as_ref()
        .map(|e| format!(" (its USB reset reported: {e})"))
        .unwrap_or_default();
    fail_then(
        FailureKind::Timeout,
        format!(
            "the Coral at {} did not come back as {} within {} s{reset}",
            wait.from.path,
            want.id(),
            wait.timeout.as_secs_f64()
        ),
        NextStep::ReplugThenInit,
    )
}

fn open_failure(coral: &CoralDevice, error: UsbError) -> anyhow::Error {
    match error {
        UsbError::Access => fail(
            FailureKind::Usb,
            format!(
                "permission denied opening the Coral at {}: run coral as root",
                coral.path
            ),
        ),
        UsbError::Busy => fail_then(
            FailureKind::Usb,
            format!(
                "the Coral at {} is in use (passed through to a VM?)",
                coral.path
            ),
            NextStep::FindHolderAndDetach,
        ),
        other => usb_failure(&format!("opening the Coral at {}", coral.path), other),
    }
}

fn dfu_failure(coral: &CoralDevice, error: DfuError) -> anyhow::Error {
    let message = match &error {
        DfuError::Usb {
            step,
            error: UsbError::NoDevice,
        } => format!(
            "the Coral at {} disappeared during the firmware upload ({step})",
            coral.path
        ),
        DfuError::Usb {
            error: UsbError::Busy,
            ..
        } => {
            return open_failure(coral, UsbError::Busy);
        }
        _ => format!(
            "firmware upload to the Coral at {} failed: {error}",
            coral.path
        ),
    };
    fail_then(FailureKind::Usb, message, NextStep::RetryInit)
}

fn usb_failure(what: &str, error: UsbError) -> anyhow::Error {
    fail_then(
        FailureKind::Usb,
        format!("{what}: {error}"),
        NextStep::RerunVerbose,
    )
}

//! The boot path: `coral up` without `--vm`, as `coral-up.service` runs it
//! before XCP-ng auto-starts VMs. It recovers every entry of the config, and
//! every wait it makes comes out of one budget ([`budget`]) that ends well
//! before the unit's start timeout, so a missing Coral or a slow xapi never
//! holds the host's VMs back for long. A failed entry is logged with the
//! command to run and the others still go ahead.

use super::up::{up_with, UpOptions, UpReport};
use crate::clock::{capped, may_begin, poll_until, Bounded, Clock};
use crate::config::{Config, Deadlines, Entry};
use crate::error::{fail_then, Failure, FailureKind, NextStep};
use crate::firmware::FirmwareImage;
use crate::ops::attach::AttachOptions;
use crate::usb::{PortPath, UsbBus};
use crate::xe::client::{VmInfo, XeClient};
use std::time::Duration;

/// Every wait of the boot path, in one place (README "Boot budget").
///
/// Worst case: the lock wait, then one deadline ([`boot_clock`]) for
/// everything after it, all Corals together: waiting for xapi and the
/// devices, every firmware download (begun only if its whole deadline is
/// left), every `xe` call (each call's timeout cut to what is left), every
/// replug and scan wait, and a restart's shutdown, follow-up and start (a
/// shutdown is begun only if what is left covers its follow-up and the
/// start: [`crate::ops::attach::START_RESERVE`]). The unit's
/// `TimeoutStartSec` is above that with a margin, and even when it is
/// reached systemd only stops coral: `xapi-domains.service` does not
/// require the unit, so VMs auto-start.
pub mod budget {
    use std::time::Duration;

    /// Another coral run holding the lock (`--lock-timeout` in the unit).
    pub const LOCK_WAIT: Duration = Duration::from_secs(30);
    /// xapi answering `xe`: the unit runs after xapi-init-complete.target,
    /// so this only covers a toolstack restart during boot.
    pub const XAPI_WAIT: Duration = Duration::from_secs(40);
    /// The configured Corals appearing on USB after power-on (`--wait-device`).
    pub const DEVICE_WAIT: Duration = crate::ops::init::DEFAULT_UP_WAIT_DEVICE;
    /// One Coral coming back as 18d1:9302 after its firmware upload (`--timeout`).
    pub const REPLUG_WAIT: Duration = crate::ops::init::DEFAULT_REPLUG_TIMEOUT;
    /// XAPI's asynchronous scan listing one ready Coral.
    pub const SCAN_WAIT: Duration = crate::ops::attach::DEFAULT_SCAN_TIMEOUT;
    /// The one deadline of everything after the lock, all entries together.
    pub const AFTER_LOCK: Duration = Duration::from_secs(120);
    /// The DFU download's own deadline (a real one takes well under a second;
    /// this bounds a device that keeps asking the host to wait); inside
    /// [`AFTER_LOCK`], and begun only if it fits there whole.
    pub const DOWNLOAD_WAIT: Duration = crate::dfu::DOWNLOAD_DEADLINE;
    /// All of coral's own waits at boot, worst case.
    pub const WORST_CASE_WAITS: Duration =
        Duration::from_secs(LOCK_WAIT.as_secs() + AFTER_LOCK.as_secs());
    /// The unit's `TimeoutStartSec`.
    pub const UNIT_START_TIMEOUT: Duration = Duration::from_secs(240);

    // One Coral's waits fit the shared deadline, and all waits fit the unit
    // with a minute to spare.
    const _: () = assert!(
        XAPI_WAIT.as_secs() + DEVICE_WAIT.as_secs() + REPLUG_WAIT.as_secs() + SCAN_WAIT.as_secs()
            <= AFTER_LOCK.as_secs()
    );
    const _: () = assert!(WORST_CASE_WAITS.as_secs() + 60 <= UNIT_START_TIMEOUT.as_secs());
    // A restart can fit: its shortest window and the start after it.
    const _: () = assert!(
        crate::ops::attach::MIN_SHUTDOWN_WINDOW.as_secs()
            + crate::ops::attach::START_RESERVE.as_secs()
            <= AFTER_LOCK.as_secs()
    );
}

/// The boot path's clock: `clock` with the one deadline, [`budget::AFTER_LOCK`]
/// from now (call it once the lock is held). Give the `XeClient` the same
/// clock ([`XeClient::bounded_by`]) so every `xe` call ends by it too.
pub fn boot_clock(clock: &dyn Clock) -> Bounded<'_> {
    Bounded::new(clock, clock.now().saturating_add(budget::AFTER_LOCK))
}

/// How often the boot path asks xapi again while it starts.
const XAPI_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How often it looks for a Coral that has not appeared yet.
const DEVICE_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What happened to one entry.
pub struct EntryOutcome {
    /// The entry.
    pub entry: Entry,
    /// `up`'s report, or why it failed.
    pub result: anyhow::Result<UpReport>,
}

/// Every entry's outcome.
pub struct BootReport {
    /// In config order.
    pub outcomes: Vec<EntryOutcome>,
}

impl BootReport {
    /// Ok when every entry succeeded; else one error line naming each failed
    /// VM and the command to rerun, with the exit code of the first failure.
    pub fn into_result(self) -> anyhow::Result<()> {
        let failed: Vec<&EntryOutcome> =
            self.outcomes.iter().filter(|o| o.result.is_err()).collect();
        let Some(first) = failed.first() else {
            return Ok(());
        };
        let kind = first
            .result
            .as_ref()
            .err()
            .and_then(|e| e.chain().find_map(|c| c.downcast_ref::<Failure>()))
            .map(|f| f.kind)
            .unwrap_or(FailureKind::Other);
        let names = failed
            .iter()
            .map(|o| o.entry.label())
            .collect::<Vec<_>>()
            .join(", ");
        Err(fail_then(
            kind,
            format!(
                "boot recovery failed for {} of {} Coral(s): {names} (reasons above); those VMs start without their Coral",
                failed.len(),
                self.outcomes.len(),
            ),
            NextStep::UpAfterFixing {
                vm: first.entry.vm_uuid.clone(),
            },
        ))
    }
}

/// Recover every entry of `config` within [`budget`]. Returns each entry's
/// outcome; never stops at the first failure.
pub fn up_all(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    config: &Config,
    dry_run: bool,
    intent: Option<&crate::mapping_state::StateStore>,
) -> anyhow::Result<BootReport> {
    if config.entries.is_empty() {
        return Err(fail_then(
            FailureKind::Other,
            "the config has no entries",
            NextStep::AddEntry,
        ));
    }
    // The one deadline (the caller's, if it already set one).
    let bounded = boot_clock(clock);
    let clock: &dyn Clock = &bounded;
    let left = |cap: Duration| capped(clock, cap);

    let probed = wait_for_xapi(xe, clock, &config.entries[0], left(budget::XAPI_WAIT))?;
    let waited = wait_for_devices(usb, clock, &config.entries, left(budget::DEVICE_WAIT));
    // The probe read the first entry's VM: unless the Coral was waited
    // for, that read is as fresh as the entry's own would be.
    let mut known_vms = (!waited).then_some(probed);

    let mut outcomes = Vec::new();
    for entry in &config.entries {
        log::info!(
            "boot: recovering the Coral{} for {}",
            entry
                .device
                .as_deref()
                .map(|d| format!(" at {d}"))
                .unwrap_or_default(),
            entry.label()
        );
        // The entry's own deadlines, each capped by its share of the budget.
        let own = |value: Option<f64>, cap: Duration| left(Deadlines::or(value, cap).min(cap));
        let opts = UpOptions {
            // The configured Corals were waited for above.
            wait_device: Duration::ZERO,
            replug_timeout: own(entry.deadlines.replug_timeout, budget::REPLUG_WAIT),
            attach: AttachOptions {
                vm: entry.vm_uuid.clone(),
                device: entry.device.clone(),
                start: entry.start,
                restart: entry.restart,
                force_shutdown: false,
                shutdown_timeout: own(
                    entry.deadlines.shutdown_timeout,
                    crate::ops::attach::DEFAULT_SHUTDOWN_TIMEOUT,
                ),
                scan_timeout: own(entry.deadlines.scan_timeout, budget::SCAN_WAIT),
                guest_lost: false,
                intent: intent.cloned(),
            },
            dry_run,
        };
        let result = may_begin(clock, || format!("recovering {}", entry.label()))
            .map_err(anyhow::Error::from)
            .and_then(|()| up_with(usb, xe, clock, load_firmware, &opts, known_vms.take()));
        if let Err(err) = &result {
            log::error!(
                "{}: {err:#}; it starts without its Coral; {}",
                entry.label(),
                NextStep::UpAfterFixing {
                    vm: entry.vm_uuid.clone()
                }
            );
        }
        outcomes.push(EntryOutcome {
            entry: entry.clone(),
            result,
        });
    }
    Ok(BootReport { outcomes })
}

/// Poll until xapi answers a read (the first entry's VM, returned), up to
/// `timeout`. Only XAPI failures (connection refused, still initialising)
/// are retried.
fn wait_for_xapi(
    xe: &XeClient,
    clock: &dyn Clock,
    entry: &Entry,
    timeout: Duration,
) -> anyhow::Result<Vec<VmInfo>> {
    let mut last = None;
    let answered = poll_until(clock, timeout, XAPI_POLL_INTERVAL, || {
        match xe.find_vms(&entry.vm_uuid) {
            Ok(vms) => Ok(Some(vms)),
            Err(err) if err.is_unavailable() => {
                if last.is_none() {
                    log::info!(
                        "boot: waiting up to {} s for xapi ({err:#})",
                        timeout.as_secs()
                    );
                }
                last = Some(err);
                Ok(None)
            }
            Err(err) => Err(crate::ops::xapi_common::xe_fail("asking xapi at boot", err)),
        }
    })?;
    match (answered, last) {
        (Some(vms), _) => Ok(vms),
        (None, Some(err)) => Err(fail_then(
            FailureKind::Xapi,
            format!(
                "xapi did not answer within {} s at boot ({err:#}); VMs auto-start without their Coral",
                timeout.as_secs()
            ),
            NextStep::CheckXapiThenUp,
        )),
        (None, None) => Err(fail_then(
            FailureKind::Xapi,
            "no time was left to ask xapi at boot",
            NextStep::Up,
        )),
    }
}

/// Poll until every entry's Coral is on USB (any Coral for an entry without
/// a device), up to `timeout`; a Coral still missing is left for its entry
/// to report. True when it had to wait.
fn wait_for_devices(
    usb: &dyn UsbBus,
    clock: &dyn Clock,
    entries: &[Entry],
    timeout: Duration,
) -> bool {
    let wanted: Vec<Option<PortPath>> = entries
        .iter()
        .map(|e| e.device.as_deref().and_then(|d| d.parse().ok()))
        .collect();
    let all_present = || -> Result<Option<()>, ()> {
        let corals = usb.list_corals().unwrap_or_default();
        let present = wanted.iter().all(|w| match w {
            Some(path) => corals.iter().any(|c| c.at_configured_port(path)),
            None => !corals.is_empty(),
        });
        Ok(present.then_some(()))
    };
    if let Ok(Some(())) = all_present() {
        return false;
    }
    log::info!(
        "boot: waiting up to {} s for the configured Coral(s) to appear on USB",
        timeout.as_secs()
    );
    if let Ok(None) = poll_until(clock, timeout, DEVICE_POLL_INTERVAL, all_present) {
        log::warn!(
            "boot: not every configured Coral appeared within {} s",
            timeout.as_secs()
        );
    }
    true
}

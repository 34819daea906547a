//! `coral up`: everything after a power loss, in order: initialize the Coral
//! if it needs it, wait until XAPI lists the ready device on this host, and
//! attach it to the VM with the rules of `coral attach`.

use super::attach::{attach, AttachOptions, AttachReport};
use super::init::{init, wait_for_coral, InitOptions, InitOutcome};
use crate::clock::Clock;
use crate::firmware::FirmwareImage;
use crate::usb::{CoralState, UsbBus};
use crate::xe::client::XeClient;
use std::fmt;
use std::time::Duration;

/// What `up` should do.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// How long to wait for `18d1:9302` after the firmware upload.
    pub replug_timeout: Duration,
    /// The attach step (its `device` also selects the Coral to initialize).
    pub attach: AttachOptions,
    /// `--dry-run`: verify the firmware but do not upload; plan the attach.
    pub dry_run: bool,
    /// `--wait-device`: how long to wait for a Coral to appear at all.
    pub wait_device: Duration,
}

/// What `up` did.
#[derive(Clone, Debug)]
pub struct UpReport {
    /// The init step, when the Coral needed firmware (None: it was ready).
    pub init: Option<InitOutcome>,
    /// The attach step (None only in a dry run that stopped before it).
    pub attach: Option<AttachReport>,
    /// Whole run.
    pub elapsed: Duration,
}

impl fmt::Display for UpReport {
    /// The one summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut done = Vec::new();
        if let Some(InitOutcome::Initialized { after, .. }) = &self.init {
            done.push(format!("firmware uploaded, Coral ready at {}", after.path));
        }
        match &self.attach {
            Some(report) if report.pending_restart => done.push(
                "passed through; the running VM gets the Coral at its next start (--restart does it now)".to_string(),
            ),
            Some(report) if report.changed => done.push("passed through to the VM".to_string()),
            Some(_) => {}
            None => done.push("dry run stopped before attach (the Coral is not ready)".to_string()),
        }
        if done.is_empty() {
            write!(
                f,
                "up: nothing to do, Coral ready and attached ({:.1} s)",
                self.elapsed.as_secs_f64()
            )
        } else {
            write!(
                f,
                "up: {} ({:.1} s)",
                done.join("; "),
                self.elapsed.as_secs_f64()
            )
        }
    }
}

/// Run the whole recovery for one Coral and one VM.
pub fn up(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &UpOptions,
) -> anyhow::Result<UpReport> {
    let started = clock.now();
    let coral = wait_for_coral(usb, clock, opts.attach.device.as_deref(), opts.wait_device)?;

    let mut init_outcome = None;
    let ready_path = match coral.state {
        CoralState::Ready => {
            log::info!("Coral at {} is ready (18d1:9302)", coral.path);
            coral.path.to_string()
        }
        CoralState::Uninitialized if opts.dry_run => {
            let image = load_firmware()?;
            log::info!(
                "dry run: would upload {} bytes of firmware to the Coral at {}, then attach it",
                image.bytes.len(),
                coral.path
            );
            return Ok(UpReport {
                init: None,
                attach: None,
                elapsed: clock.now() - started,
            });
        }
        CoralState::Uninitialized => {
            let init_opts = InitOptions {
                device: Some(coral.path.to_string()),
                force: false,
                replug_timeout: opts.replug_timeout,
                wait_device: Duration::ZERO,
            };
            let outcome = init(usb, clock, load_firmware, &init_opts)?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow::anyhow!("init reported no Coral at {}", coral.path))?;
            let path = outcome.ready_device().path.to_string();
            init_outcome = Some(outcome);
            path
        }
    };

    let attach_opts = AttachOptions {
        device: Some(ready_path),
        ..opts.attach.clone()
    };
    let report = attach(usb, xe, clock, &attach_opts)?;
    Ok(UpReport {
        init: init_outcome,
        attach: Some(report),
        elapsed: clock.now() - started,
    })
}

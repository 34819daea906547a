//! `coral up`: everything after a power loss, in order: initialize the Coral
//! if it needs it, wait until XAPI lists the ready device on this host, and
//! attach it to the VM with the rules of `coral attach`.

use super::attach::{attach_planned, start_plan, AttachOptions, AttachReport, Plan, StartedPlan};
use super::init::{init_with, wait_for_coral, InitOptions, InitOutcome};
use super::xapi_common::{check_vm_spec, poll_scan, SCAN_FIRST_LOOK};
use crate::clock::Clock;
use crate::error::{fail, FailureKind, Flag};
use crate::firmware::FirmwareImage;
use crate::usb::{CoralDevice, CoralState, UsbBus};
use crate::xe::client::{VmInfo, XeClient};
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
    /// A dry run: the report says what would be done.
    pub dry_run: bool,
    /// In a dry run, the port of the Coral the firmware would be uploaded to.
    pub would_upload_to: Option<String>,
}

impl fmt::Display for UpReport {
    /// The one summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            return self.fmt_dry_run(f);
        }
        let mut done = Vec::new();
        if let Some(InitOutcome::Initialized { after, .. }) = &self.init {
            done.push(format!("firmware uploaded, Coral ready at {}", after.path));
        }
        match &self.attach {
            Some(report) if report.pending_restart => done.push(format!(
                "passed through; the running VM gets the Coral at its next start ({} does it now)",
                Flag::Restart
            )),
            Some(report) if report.changed => done.push("passed through to the VM".to_string()),
            Some(_) | None => {}
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

impl UpReport {
    /// The summary of a dry run: what would be done, never what was.
    fn fmt_dry_run(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let planned = |prefix: &str| {
            (self.attach.iter())
                .flat_map(|r| r.lines.iter())
                .any(|l| l.starts_with(prefix))
        };
        let mut would = Vec::new();
        if let Some(path) = &self.would_upload_to {
            would.push(format!("would upload the firmware to the Coral at {path}"));
            would.push("would pass it through to the VM once XAPI lists it".to_string());
        } else if let Some(report) = &self.attach {
            if report.changed {
                would.push("would pass it through to the VM".to_string());
            }
            if planned("would restart") {
                would.push("would restart the VM once (clean shutdown, start)".to_string());
            } else if planned("would start") {
                would.push("would start the VM".to_string());
            } else if report.pending_restart {
                would.push(format!(
                    "the running VM would get the Coral at its next start ({} does it now)",
                    Flag::Restart
                ));
            }
        }
        if would.is_empty() {
            would.push("nothing to do, Coral ready and attached".to_string());
        }
        write!(
            f,
            "up: {} (dry run, {:.1} s)",
            would.join("; "),
            self.elapsed.as_secs_f64()
        )
    }
}

/// Run the whole recovery for one Coral and one VM.
///
/// The XAPI reads (the VM, its VUSBs, the pool's PUSBs: three `xe` calls in
/// flight together) start before the USB work and run beside the firmware
/// upload. Every check they allow is made after the verified download and
/// before the reset: a wrong `--vm` or a VM XAPI cannot pass USB to leaves
/// the Coral the boot loader it was (a rerun downloads again) and XAPI
/// untouched. The stale records of a power loss are let go while the bus
/// still shows the boot loader (see [`wait_for_stale_records_to_go`]); no
/// XAPI write happens before all of this has passed.
pub fn up(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &UpOptions,
) -> anyhow::Result<UpReport> {
    up_with(usb, xe, clock, load_firmware, opts, None)
}

/// [`up`], given the answer of a lookup of `opts.attach.vm` the caller has
/// just made (`known_vms`; the boot path's xapi probe), not asked again.
pub fn up_with(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    load_firmware: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    opts: &UpOptions,
    known_vms: Option<Vec<VmInfo>>,
) -> anyhow::Result<UpReport> {
    let started = clock.now();
    check_vm_spec(&opts.attach.vm)?;
    let coral = wait_for_coral(usb, clock, opts.attach.device.as_deref(), opts.wait_device)?;
    let corals = usb.list_corals()?;
    let mut reads = Some(start_plan(xe, &opts.attach.vm, known_vms)?);
    let finish = |reads: &mut Option<StartedPlan>| match reads.take() {
        Some(reads) => reads.finish(xe),
        None => Err(anyhow::anyhow!("the XAPI reads were already collected")),
    };
    let report = |init, attach| UpReport {
        init,
        attach: Some(attach),
        elapsed: clock.now() - started,
        dry_run: opts.dry_run,
        would_upload_to: None,
    };

    if coral.state == CoralState::Ready {
        log::info!("Coral at {} is ready (18d1:9302)", coral.path);
        let plan = finish(&mut reads)?;
        let path = coral.path.to_string();
        let attach = attach_planned(usb, xe, clock, &opts.attach, &plan, &path, None)?;
        return Ok(report(None, attach));
    }
    if opts.dry_run {
        let plan = finish(&mut reads)?;
        let stale = stale_records(xe, &plan, &corals);
        let image = load_firmware()?;
        log::info!(
            "would upload {} bytes of firmware to the Coral at {}, then attach it",
            image.bytes.len(),
            coral.path
        );
        let mut attach = AttachReport::default();
        attach.lines.push(format!(
            "would upload the firmware to the Coral at {}, wait for XAPI to list it, and attach it to {} (checked){}",
            coral.path,
            plan.vm.label,
            if stale.is_empty() {
                String::new()
            } else {
                format!(
                    " (XAPI still lists {} stale 18d1:9302 record(s) from before a power loss; they are not trusted)",
                    stale.len()
                )
            }
        ));
        return Ok(UpReport {
            would_upload_to: Some(coral.path.to_string()),
            ..report(None, attach)
        });
    }

    // Under a deadline (the boot budget), a download is begun only if its
    // whole deadline fits; after a stop, not at all.
    crate::clock::may_begin(clock, || {
        format!("uploading firmware to the Coral at {}", coral.path)
    })?;
    if let Some(left) = crate::clock::budget_left(clock) {
        if left < crate::dfu::DOWNLOAD_DEADLINE {
            return Err(fail(
                FailureKind::Timeout,
                format!(
                    "{} s are left of the boot budget, less than a firmware upload may take ({} s); the Coral at {} was not touched",
                    left.as_secs(),
                    crate::dfu::DOWNLOAD_DEADLINE.as_secs(),
                    coral.path
                ),
            ));
        }
    }
    let init_opts = InitOptions {
        device: Some(coral.path.to_string()),
        force: false,
        replug_timeout: opts.replug_timeout,
        wait_device: Duration::ZERO,
    };
    // Filled in before the reset: the plan, and the Coral records listed
    // then (not trusted after it).
    let mut checked: Option<(Plan, Vec<String>)> = None;
    let outcome = {
        let mut before_reset = || -> anyhow::Result<()> {
            let plan = finish(&mut reads)?;
            let stale = stale_records(xe, &plan, &corals);
            if !stale.is_empty() {
                wait_for_stale_records_to_go(xe, clock, &stale, opts.attach.scan_timeout);
            }
            let before = plan
                .pusbs
                .iter()
                .filter(|p| p.host == xe.host_uuid() && p.is_ready_coral())
                .map(|p| p.uuid.clone())
                .collect();
            checked = Some((plan, before));
            Ok(())
        };
        init_with(usb, clock, load_firmware, &init_opts, &mut before_reset)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("init reported no Coral at {}", coral.path))?
    };
    let path = outcome.ready_device().path.to_string();
    let attach = match checked {
        Some((plan, before)) => {
            attach_planned(usb, xe, clock, &opts.attach, &plan, &path, Some(before))?
        }
        // Ready by the time init looked (no reset by this run).
        None => attach_planned(
            usb,
            xe,
            clock,
            &opts.attach,
            &finish(&mut reads)?,
            &path,
            None,
        )?,
    };
    Ok(report(Some(outcome), attach))
}

/// 18d1:9302 records of this host whose device is not on the bus now:
/// stale (from before a power loss); a scan can only remove them, perhaps
/// after this run read them.
fn stale_records(xe: &XeClient, plan: &Plan, corals: &[CoralDevice]) -> Vec<String> {
    let ready_paths: Vec<String> = corals
        .iter()
        .filter(|c| c.state == CoralState::Ready)
        .map(|c| c.path.to_string())
        .collect();
    plan.pusbs
        .iter()
        .filter(|p| {
            p.host == xe.host_uuid() && p.is_ready_coral() && !ready_paths.contains(&p.path)
        })
        .map(|p| p.uuid.clone())
        .collect()
}

/// While the bus still shows the boot loader, a scan can only remove the
/// stale records: ask for one and wait (bounded) until they are gone, so
/// that none is removed later, under the attach. A failure here is not
/// fatal: the attach trusts no record listed before the reset anyway.
fn wait_for_stale_records_to_go(
    xe: &XeClient,
    clock: &dyn Clock,
    stale: &[String],
    timeout: Duration,
) {
    log::info!(
        "XAPI still lists {} 18d1:9302 record(s) from before the power loss; letting its scan remove them first",
        stale.len()
    );
    if let Err(err) = xe.pusb_scan() {
        log::warn!("`xe pusb-scan` failed ({err}); waiting for XAPI's own scan");
    }
    let gone = poll_scan(clock, timeout, SCAN_FIRST_LOOK, |_| {
        xe.ready_pusbs()
            .map(|listed| (!listed.iter().any(|p| stale.contains(&p.uuid))).then_some(()))
    });
    match gone {
        Ok(Some(())) => log::debug!("the stale records are gone"),
        Ok(None) => log::warn!(
            "XAPI still lists stale Coral records after {} s; they will not be used",
            timeout.as_secs()
        ),
        Err(err) => log::warn!("could not watch the stale records ({err}); they will not be used"),
    }
}

//! `coral attach`: make XAPI pass the ready Coral on this host through to a
//! VM. XAPI attaches USB only when a VM starts, so a running VM gets the
//! Coral at its next start — now, with `--restart` (one clean restart).

use super::xapi_common::{ready_coral, resolve_vm, wait_for_pusb};
use crate::clock::Clock;
use crate::error::{fail, FailureKind};
use crate::usb::UsbBus;
use crate::xe::client::{VmInfo, XeClient, CALL_TIMEOUT};
use std::fmt;
use std::time::Duration;

/// Most VUSBs XAPI allows per VM.
pub const MAX_VUSBS_PER_VM: usize = 6;

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
    /// The VM runs without the Coral; it gets it at its next start.
    pub pending_restart: bool,
    /// The running VM was restarted (clean shutdown, start) to get the Coral.
    pub restarted: bool,
}

impl AttachReport {
    fn say(&mut self, line: String) {
        log::info!("{line}");
        self.lines.push(line);
    }
}

impl fmt::Display for AttachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join("\n"))
    }
}

/// Attach the ready Coral on this host to `opts.vm`.
pub fn attach(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    opts: &AttachOptions,
) -> anyhow::Result<AttachReport> {
    let mut report = AttachReport::default();
    let coral = ready_coral(usb, opts.device.as_deref())?;
    let vm = resolve_vm(xe, &opts.vm)?;
    let label = format!("VM '{}'", vm.name);
    if vm.power_state == "paused" || vm.power_state == "suspended" {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "{label} is {}; XAPI cannot pass USB to it: resume it or shut it down, then rerun",
                vm.power_state
            ),
        ));
    }

    let Some(pusb) = wait_for_pusb(xe, clock, &coral, opts.scan_timeout)? else {
        report.say(format!(
            "dry run: would wait for XAPI to list the Coral at {}, then attach it to {label}",
            coral.path
        ));
        return Ok(report);
    };
    let vusbs = xe.vusbs_of_group(&pusb.group)?;
    if let Some(other) = vusbs.iter().find(|v| v.vm_uuid != vm.uuid) {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "the Coral at {} is already passed through to VM '{}' ({}); run `coral detach --vm {}` first",
                coral.path, other.vm_name, other.vm_uuid, other.vm_uuid
            ),
        ));
    }
    let existing = vusbs.first();
    if vm.power_state == "running" && existing.is_some_and(|v| v.attached) {
        report.say(format!(
            "the Coral at {} is attached to running {label}; nothing to do",
            coral.path
        ));
        return Ok(report);
    }

    if !pusb.passthrough {
        xe.enable_passthrough(&pusb.uuid)?;
        report.changed = true;
        report.say(format!(
            "{} passthrough of the Coral at {} (PUSB {})",
            verb(xe, "enabled", "would enable"),
            coral.path,
            short(&pusb.uuid)
        ));
    }
    let created = match existing {
        Some(vusb) => {
            report.say(format!(
                "{label} already has the Coral's VUSB {}",
                short(&vusb.uuid)
            ));
            None
        }
        None => {
            check_vusb_limits(xe, &vm, &label)?;
            let uuid = xe.vusb_create(&pusb.group, &vm.uuid)?;
            report.changed = true;
            report.say(format!(
                "{} VUSB {} linking the Coral at {} to {label}",
                verb(xe, "created", "would create"),
                short(&uuid),
                coral.path
            ));
            Some(uuid)
        }
    };

    match vm.power_state.as_str() {
        "halted" if opts.start => {
            if let Err(err) = xe.vm_start(&vm.uuid) {
                roll_back(xe, created.as_deref());
                return Err(err.context(format!(
                    "starting {label} with the Coral failed; it stays halted"
                )));
            }
            report.say(format!(
                "{} {label}; it has the Coral",
                verb(xe, "started", "would start")
            ));
        }
        "halted" => report.say(format!(
            "{label} is halted; it gets the Coral when it starts (or pass --start)"
        )),
        _ if opts.restart => {
            let vusb = created.clone().or_else(|| existing.map(|v| v.uuid.clone()));
            restart_with_coral(xe, &vm, &label, created.as_deref(), vusb.as_deref(), opts)?;
            report.changed = true;
            report.restarted = !xe.dry_run();
            report.say(format!(
                "{} {label} once (clean shutdown, start); it has the Coral",
                verb(xe, "restarted", "would restart")
            ));
        }
        _ => {
            report.pending_restart = true;
            report.say(format!(
            "{label} is running; XAPI attaches USB only at VM start, so the Coral arrives at its next start (restart now: `coral attach --vm {} --restart`)",
            vm.uuid
        ))
        }
    }
    Ok(report)
}

/// XAPI's VUSB limits, checked before calling so the error is clear.
fn check_vusb_limits(xe: &XeClient, vm: &VmInfo, label: &str) -> anyhow::Result<()> {
    if vm.ha_restart_priority == "restart" {
        return Err(fail(
            FailureKind::Vm,
            format!("{label} is protected by HA (restart priority 'restart'), which XAPI forbids with USB passthrough; change its HA priority first"),
        ));
    }
    let count = xe.vusb_count_of_vm(&vm.uuid)?;
    if count >= MAX_VUSBS_PER_VM {
        return Err(fail(
            FailureKind::Vm,
            format!("{label} already has {count} VUSBs, XAPI's limit; remove one (`xe vusb-list vm-uuid={}`)", vm.uuid),
        ));
    }
    Ok(())
}

/// Clean shutdown (never forced unless asked), then start. From the moment
/// the VM is down it is started again whatever fails: without the Coral if
/// the start with it fails.
fn restart_with_coral(
    xe: &XeClient,
    vm: &VmInfo,
    label: &str,
    created: Option<&str>,
    vusb: Option<&str>,
    opts: &AttachOptions,
) -> anyhow::Result<()> {
    log::info!(
        "shutting {label} down cleanly (up to {} s)",
        opts.shutdown_timeout.as_secs()
    );
    if let Err(clean) = xe.vm_shutdown(&vm.uuid, false, opts.shutdown_timeout) {
        let state = xe.power_state(&vm.uuid)?;
        if state != "halted" {
            if !opts.force_shutdown {
                roll_back(xe, created);
                return Err(fail(
                    FailureKind::Vm,
                    format!(
                        "{label} did not shut down cleanly ({clean}); it is still {state} and unchanged; retry with a longer --shutdown-timeout, or --force-shutdown"
                    ),
                ));
            }
            log::warn!("{label} did not shut down cleanly; forcing it off (--force-shutdown)");
            if let Err(forced) = xe.vm_shutdown(&vm.uuid, true, CALL_TIMEOUT) {
                roll_back(xe, created);
                return Err(fail(
                    FailureKind::Vm,
                    format!("{label} could not be shut down ({forced}); it is still {state}"),
                ));
            }
        }
    }
    if let Err(with_coral) = xe.vm_start(&vm.uuid) {
        log::warn!("starting {label} with the Coral failed; starting it without the Coral");
        if let Some(vusb) = vusb {
            if let Err(err) = xe.vusb_destroy(vusb) {
                log::warn!("could not remove the Coral's VUSB {vusb}: {err:#}");
            }
        }
        return match xe.vm_start(&vm.uuid) {
            Ok(()) => Err(with_coral.context(format!(
                "{label} would not start with the Coral, so it was started again without it; check `xe vm-start` errors and dmesg, then rerun"
            ))),
            Err(again) => Err(again.context(format!(
                "{label} is DOWN: it would not start with the Coral nor without it; start it by hand: `xe vm-start uuid={}`",
                vm.uuid
            ))),
        };
    }
    Ok(())
}

/// Destroy the VUSB this run created, so a failed run leaves nothing behind.
fn roll_back(xe: &XeClient, created: Option<&str>) {
    if let Some(uuid) = created {
        match xe.vusb_destroy(uuid) {
            Ok(()) => log::info!("rolled back: destroyed VUSB {}", short(uuid)),
            Err(err) => log::warn!("could not destroy VUSB {uuid} created by this run: {err:#}"),
        }
    }
}

/// The first 8 characters of a uuid, for messages (placeholders whole).
pub fn short(uuid: &str) -> &str {
    if uuid.starts_with('<') {
        return uuid;
    }
    uuid.get(..8).unwrap_or(uuid)
}

/// What was done, or in a dry run what would be.
fn verb<'a>(xe: &XeClient, done: &'a str, planned: &'a str) -> &'a str {
    if xe.dry_run() {
        planned
    } else {
        done
    }
}

//! `coral attach`: make XAPI pass the ready Coral on this host through to a
//! VM. XAPI attaches USB only when a VM starts, so a running VM gets the
//! Coral at its next start — now, with `--restart` (one clean restart).
//!
//! Everything is read first ([`read_plan`]), every precondition the reads
//! reveal is checked, and only then is anything written. An `xe` call that
//! outlives its deadline is followed to its end inside xapi before the
//! procedure acts on the outcome.

use super::xapi_common::{
    check_vm_spec, guest_node_of, pick_vm, poll_scan, pusb_at, ready_coral, wait_for_pusb, xe_fail,
    Vm, SCAN_FIRST_LOOK,
};
use crate::clock::{budget_left, capped, follow_until, may_begin, Bounded, Clock};
use crate::error::{fail, fail_then, FailureKind, Flag, NextStep};
use crate::mapping_state::StateStore;
use crate::usb::{CoralState, NodeCheck, UsbBus};
use crate::xe::client::{
    PowerState, PusbInfo, Started, StartedVms, VmInfo, VusbInfo, XeClient, CALL_TIMEOUT,
};
use crate::xe::{looks_like_uuid, short, XeError};
use std::fmt;
use std::time::Duration;

/// Most VUSBs XAPI allows per VM.
pub const MAX_VUSBS_PER_VM: usize = 6;
/// How long a clean shutdown may take, unless told otherwise.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long XAPI gets to list the ready Coral (its USB scan is asynchronous),
/// unless told otherwise.
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an operation whose `xe` gave up is followed inside xapi (longer
/// than xapi's own 60 s for a guest that never acknowledges a shutdown).
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a followed operation is looked at.
pub const FOLLOW_POLL: Duration = Duration::from_secs(1);
/// How long the records are checked after a failed USB reset at VM start.
const RESET_RECHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Under a deadline (the boot budget): the time kept, after a shutdown and
/// its follow-up, for starting the VM again (with the Coral, then without).
pub const START_RESERVE: Duration = Duration::from_secs(60);
/// Under a deadline: the least time a clean shutdown and its follow-up get;
/// with less left than this plus [`START_RESERVE`], no shutdown is begun.
pub const MIN_SHUTDOWN_WINDOW: Duration = Duration::from_secs(30);

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
    /// The caller saw the Coral re-enumerate as itself under the running
    /// VM (the watcher's memory): the guest has lost it, whatever the
    /// stateless check says.
    pub guest_lost: bool,
    /// Where a restart's intent is written before its shutdown begins and
    /// cleared once coral is done with the VM (write-ahead; None: not kept).
    pub intent: Option<StateStore>,
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
    /// The VM's uuid (to resume a mapping paused by `coral detach`).
    pub vm_uuid: String,
    /// XAPI shows the Coral attached, yet the guest lost it (it
    /// re-enumerated after the VM started): the VM needs a restart.
    pub guest_lost: bool,
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

/// What the reads before any write found: the VM, its VUSBs, the pool's
/// PUSBs. Every check that needs no Coral record has passed.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The VM.
    pub vm: Vm,
    /// Its VUSBs.
    pub vm_vusbs: Vec<VusbInfo>,
    /// Every PUSB of the pool, as listed then.
    pub pusbs: Vec<PusbInfo>,
}

/// Resolve the VM and read what the attach depends on; refuse now what
/// cannot work (paused or suspended VM, an operation in progress on it, a
/// VUSB on another host's device). The reads run together ([`start_plan`]).
pub fn read_plan(xe: &XeClient, spec: &str) -> anyhow::Result<Plan> {
    start_plan(xe, spec, None)?.finish(xe)
}

/// The three reads of a plan (the VM, its VUSBs, the pool's PUSBs), all
/// in flight at once from [`start_plan`] until [`StartedPlan::finish`].
pub struct StartedPlan<'a> {
    spec: String,
    /// The lookup, or its answer when the caller has just read it.
    vms: Result<StartedVms<'a>, Vec<VmInfo>>,
    /// The VUSBs of `vusbs_of` (a uuid-like spec), else of the whole pool.
    vusbs: Started<'a, Vec<VusbInfo>>,
    vusbs_of: Option<String>,
    pusbs: Started<'a, Vec<PusbInfo>>,
}

/// Start the reads of a plan; they run while the caller does other work.
/// `known_vms`: the answer of a lookup of `spec` the caller has just made
/// (the boot path's first read), not asked again. A `spec` XAPI cannot be
/// asked about is refused before any call.
pub fn start_plan<'a>(
    xe: &XeClient<'a>,
    spec: &str,
    known_vms: Option<Vec<VmInfo>>,
) -> anyhow::Result<StartedPlan<'a>> {
    check_vm_spec(spec)?;
    let vusbs_of = looks_like_uuid(spec).then(|| spec.to_string());
    Ok(StartedPlan {
        spec: spec.to_string(),
        vms: match known_vms {
            Some(known) => Err(known),
            None => Ok(xe.start_find_vms(spec)),
        },
        vusbs: xe.start_vusbs(vusbs_of.as_deref()),
        vusbs_of,
        pusbs: xe.start_pusbs(),
    })
}

impl StartedPlan<'_> {
    /// Collect the reads and check them (see [`read_plan`]).
    pub fn finish(self, xe: &XeClient) -> anyhow::Result<Plan> {
        let spec = self.spec.as_str();
        let vms = match self.vms {
            Ok(started) => xe
                .finish_vms(started)
                .map_err(|e| xe_fail("looking up the VM", e))?,
            Err(known) => known,
        };
        let vm = pick_vm(spec, vms)?;
        let vusbs = xe.finish(self.vusbs);
        let pusbs = xe.finish(self.pusbs);
        let vm_vusbs = match vusbs {
            // The spec was a name that looks like a uuid: ask for the VM's own.
            Ok(_) if self.vusbs_of.as_deref() != Some(vm.uuid()) && self.vusbs_of.is_some() => {
                xe.vusbs_of_vm(vm.uuid())
            }
            Ok(all) => Ok(all.into_iter().filter(|v| v.vm_uuid == vm.uuid()).collect()),
            Err(err) => Err(err),
        };
        checked_plan(xe, vm, vm_vusbs, pusbs)
    }
}

/// The plan's checks on what was read.
fn checked_plan(
    xe: &XeClient,
    vm: Vm,
    vm_vusbs: Result<Vec<VusbInfo>, XeError>,
    pusbs: Result<Vec<PusbInfo>, XeError>,
) -> anyhow::Result<Plan> {
    let label = &vm.label;
    if matches!(
        vm.info.power_state,
        PowerState::Paused | PowerState::Suspended
    ) {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "{label} is {}; XAPI cannot pass USB to it: resume it or shut it down, then rerun",
                vm.info.power_state
            ),
        ));
    }
    if !vm.info.current_operations.is_empty() {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "{label} is busy ({} in progress in XAPI); rerun when it has finished (`xe vm-param-get uuid={} param-name=current-operations`)",
                vm.info.current_operations.join(", "),
                vm.uuid()
            ),
        ));
    }
    let vm_vusbs = vm_vusbs.map_err(|e| xe_fail("listing the VM's VUSBs", e))?;
    let pusbs = pusbs.map_err(|e| xe_fail("listing the pool's USB devices", e))?;
    for vusb in &vm_vusbs {
        let Some(pusb) = pusbs.iter().find(|p| p.group == vusb.group) else {
            continue;
        };
        if pusb.host != xe.host_uuid() {
            let host_name = xe
                .param("host", &pusb.host, "name-label")
                .map(|n| format!("'{}' ", n.escape_debug()))
                .unwrap_or_default();
            return Err(fail(
                FailureKind::Vm,
                format!(
                    "{label} already has VUSB {} on the USB device at {} of host {host_name}({}); a VM starts only on the host holding all its USB devices, so a second one here would keep it from starting (NO_HOSTS_AVAILABLE): run coral on that host, or remove that VUSB first (`xe vusb-destroy uuid={}`)",
                    vusb.uuid, pusb.path, pusb.host, vusb.uuid
                ),
            ));
        }
    }
    Ok(Plan {
        vm,
        vm_vusbs,
        pusbs,
    })
}

/// Attach the ready Coral on this host to `opts.vm`.
pub fn attach(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    opts: &AttachOptions,
) -> anyhow::Result<AttachReport> {
    let coral = ready_coral(usb, opts.device.as_deref())?;
    let plan = read_plan(xe, &opts.vm)?;
    attach_planned(usb, xe, clock, opts, &plan, &coral.path.to_string(), None)
}

/// The attach once the Coral is ready at `path`. `reenumerated`: this run
/// reset the Coral, and these PUSB uuids were listed before the reset (not
/// to be trusted: a scan that read the bus before the reset may still
/// delete them); the records used must come from a scan after the reset.
pub fn attach_planned(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    opts: &AttachOptions,
    plan: &Plan,
    path: &str,
    reenumerated: Option<Vec<String>>,
) -> anyhow::Result<AttachReport> {
    let mut report = AttachReport {
        vm_uuid: plan.vm.uuid().to_string(),
        ..AttachReport::default()
    };
    let vm = &plan.vm;
    let label = vm.label.as_str();
    let distrust = reenumerated.clone().unwrap_or_default();
    let (vusb, created) = {
        let listed = if reenumerated.is_some() {
            None
        } else {
            pusb_at(&plan.pusbs, xe.host_uuid(), path, &distrust).cloned()
        };
        let pusb = match listed {
            Some(pusb) => pusb,
            None => {
                let after_reset = reenumerated.is_some();
                match wait_for_pusb(xe, clock, path, &distrust, after_reset, opts.scan_timeout)? {
                    Some(pusb) => pusb,
                    None => {
                        report.say(format!(
                            "would wait for XAPI to list the Coral at {path}, then attach it to {label}"
                        ));
                        return Ok(report);
                    }
                }
            }
        };
        let holders = group_holders(xe, plan, &pusb)?;
        if let Some(other) = holders.iter().find(|v| v.vm_uuid != vm.uuid()) {
            let name = xe
                .param("vm", &other.vm_uuid, "name-label")
                .map(|n| format!("'{}' ", n.escape_debug()))
                .unwrap_or_default();
            return Err(fail_then(
                FailureKind::Vm,
                format!(
                    "the Coral at {path} is already passed through to VM {name}({})",
                    other.vm_uuid
                ),
                NextStep::Detach {
                    vm: other.vm_uuid.clone(),
                },
            ));
        }
        let existing = holders.into_iter().find(|v| v.vm_uuid == vm.uuid());
        if vm.info.power_state == PowerState::Running {
            if let Some(held) = existing.as_ref().filter(|v| v.attached) {
                let why = lost_why(usb, opts, vm, path);
                return match why {
                    None => {
                        report.say(format!(
                            "the Coral at {path} is attached to running {label}; nothing to do"
                        ));
                        Ok(report)
                    }
                    Some(why) => restart_lost(xe, clock, opts, vm, &held.uuid, path, &why, report),
                };
            }
        }
        if existing.is_none() {
            check_vusb_limits(usb, xe, clock, plan, opts.scan_timeout)?;
        }

        // Every known precondition has passed: write (unless a stop came).
        may_begin(clock, || {
            format!("passing the Coral at {path} through to {label}")
        })?;
        if !pusb.passthrough {
            xe.enable_passthrough(&pusb.uuid)
                .map_err(|e| xe_fail("enabling passthrough", e))?;
            report.changed = true;
            report.say(format!(
                "{} passthrough of the Coral at {path} (PUSB {})",
                verb(xe, "enabled", "would enable"),
                short(&pusb.uuid)
            ));
        }
        let (vusb, created) = match existing {
            Some(vusb) => {
                report.say(format!(
                    "{label} already has the Coral's VUSB {}",
                    short(&vusb.uuid)
                ));
                (vusb.uuid, false)
            }
            None => {
                let uuid = create_vusb(xe, clock, &pusb.group, vm.uuid())?;
                report.changed = true;
                report.say(format!(
                    "{} VUSB {} linking the Coral at {path} to {label}",
                    verb(xe, "created", "would create"),
                    short(&uuid)
                ));
                (uuid, true)
            }
        };
        // No recheck: a PUSB listed after the reset and not before it was
        // created by a scan that read the bus after the reset, so every
        // earlier scan has committed (scans run in order) and a later one
        // keeps it unless the Coral changes again (README, "Stale records").
        (vusb, created)
    };

    match vm.info.power_state {
        PowerState::Halted if opts.start => {
            may_begin(clock, || format!("starting {label}"))?;
            start_with_coral(xe, clock, vm, &vusb, created, false)?;
            report.changed = true;
            report.say(format!(
                "{} {label}; it has the Coral",
                verb(xe, "started", "would start")
            ));
        }
        PowerState::Halted => report.say(format!(
            "{label} is halted; it gets the Coral when it starts (or pass {})",
            Flag::Start
        )),
        _ if opts.restart && !restart_fits(clock) => {
            report.pending_restart = true;
            report.say(format!(
                "{label} is running; not restarted: {} s are left of the boot budget and a restart needs {} s; the Coral arrives at its next start ({})",
                budget_left(clock).unwrap_or_default().as_secs(),
                (MIN_SHUTDOWN_WINDOW + START_RESERVE).as_secs(),
                NextStep::RestartNow {
                    vm: vm.uuid().to_string()
                }
            ));
        }
        _ if opts.restart => {
            may_begin(clock, || format!("restarting {label}"))?;
            restart_with_coral(xe, clock, vm, &vusb, created, opts, &mut report)?;
            report.changed = true;
            report.restarted = !xe.dry_run();
            report.say(format!(
                "{} {label} once (clean shutdown, start){}; it has the Coral",
                verb(xe, "restarted", "would restart"),
                elsewhere(xe, &vm.info, " on this host, where the Coral is")
            ));
        }
        _ => {
            report.pending_restart = true;
            report.say(format!(
                "{label} is running{}; XAPI attaches USB only at VM start, so the Coral arrives at its next start{} ({})",
                elsewhere(xe, &vm.info, " on another host"),
                elsewhere(xe, &vm.info, ", on this host"),
                NextStep::RestartNow {
                    vm: vm.uuid().to_string()
                }
            ))
        }
    }
    Ok(report)
}

/// Under a deadline, a shutdown is begun only if what is left covers its
/// follow-up and the start after it.
fn restart_fits(clock: &dyn Clock) -> bool {
    budget_left(clock).is_none_or(|left| left >= MIN_SHUTDOWN_WINDOW + START_RESERVE)
}

/// Why the running VM lost the Coral XAPI shows attached to it, or None
/// when it has not. QEMU's marks decide when the host has them; without
/// them only the caller's own sighting of the re-enumeration
/// (`opts.guest_lost`) counts: an unknown answer alone never restarts.
fn lost_why(usb: &dyn UsbBus, opts: &AttachOptions, vm: &Vm, path: &str) -> Option<String> {
    // The dom-id came with the plan's VM record: no call of its own.
    match guest_node_of(usb, vm.info.dom_id, path) {
        NodeCheck::Lost { node } => Some(format!(
            "the Coral at {path} re-enumerated as {node} after the VM started, and QEMU still holds the old node"
        )),
        NodeCheck::Given => None,
        NodeCheck::Unknown(_) if opts.guest_lost => Some(format!(
            "the Coral at {path} re-enumerated as itself (a USB remove and add) while attached"
        )),
        NodeCheck::Unknown(why) => {
            log::debug!("whether the guest holds the Coral at {path}: {why}");
            None
        }
    }
}

/// The running VM lost the Coral XAPI still shows attached: with
/// `--restart`, one clean restart (XAPI attaches USB only at VM start);
/// without, say so and what restarts it.
#[allow(clippy::too_many_arguments)]
fn restart_lost(
    xe: &XeClient,
    clock: &dyn Clock,
    opts: &AttachOptions,
    vm: &Vm,
    vusb: &str,
    path: &str,
    why: &str,
    mut report: AttachReport,
) -> anyhow::Result<AttachReport> {
    let label = &vm.label;
    report.guest_lost = true;
    if !opts.restart || !restart_fits(clock) {
        report.pending_restart = true;
        report.say(format!(
            "{label} lost its Coral: {why}; XAPI still shows it attached, but only a VM restart gives it back ({})",
            NextStep::RestartNow {
                vm: vm.uuid().to_string()
            }
        ));
        return Ok(report);
    }
    may_begin(clock, || format!("restarting {label}"))?;
    log::warn!("{label} lost its Coral ({why}); restarting it once");
    restart_with_coral(xe, clock, vm, vusb, false, opts, &mut report)?;
    report.changed = true;
    report.restarted = !xe.dry_run();
    report.say(format!(
        "{} {label} once (clean shutdown, start): it had lost its Coral at {path}; it has the Coral again",
        verb(xe, "restarted", "would restart")
    ));
    Ok(report)
}

/// `text` when the VM runs on another host than this one.
fn elsewhere<'t>(xe: &XeClient, vm: &VmInfo, text: &'t str) -> &'t str {
    match &vm.resident_on {
        Some(host) if host != xe.host_uuid() => text,
        _ => "",
    }
}

/// The VUSBs on the Coral's group: none on a group XAPI created after the
/// reads (fresh), the VM's own when it has one there, else asked.
fn group_holders(xe: &XeClient, plan: &Plan, pusb: &PusbInfo) -> anyhow::Result<Vec<VusbInfo>> {
    let own: Vec<VusbInfo> = plan
        .vm_vusbs
        .iter()
        .filter(|v| v.group == pusb.group)
        .cloned()
        .collect();
    if !own.is_empty() {
        return Ok(own);
    }
    if !plan.pusbs.iter().any(|p| p.uuid == pusb.uuid) {
        return Ok(Vec::new());
    }
    xe.vusbs_of_group(&pusb.group)
        .map_err(|e| xe_fail("listing the Coral's VUSBs", e))
}

/// XAPI's VUSB limits, checked before any write so the error is clear. A
/// VUSB on a Coral record that is no longer on the bus with its identity
/// (e.g. the boot loader's, after the firmware upload) is XAPI's to delete
/// at its next scan: it is not an obstacle, but XAPI still counts it, so
/// wait for that scan (bounded by `scan_timeout`) before creating ours.
fn check_vusb_limits(
    usb: &dyn UsbBus,
    xe: &XeClient,
    clock: &dyn Clock,
    plan: &Plan,
    scan_timeout: Duration,
) -> anyhow::Result<()> {
    let label = &plan.vm.label;
    if plan.vm.info.ha_restart_priority == "restart" {
        return Err(fail(
            FailureKind::Vm,
            format!("{label} is protected by HA (restart priority 'restart'), which XAPI forbids with USB passthrough; change its HA priority first"),
        ));
    }
    let count = plan.vm_vusbs.len();
    if count < MAX_VUSBS_PER_VM {
        return Ok(());
    }
    let doomed = doomed_vusbs(usb, xe, plan);
    if count - doomed.len() >= MAX_VUSBS_PER_VM {
        return Err(fail(
            FailureKind::Vm,
            format!("{label} already has {count} VUSBs, XAPI's limit; remove one (`xe vusb-list vm-uuid={}`)", plan.vm.uuid()),
        ));
    }
    log::info!(
        "{label} has {count} VUSBs, {} of them on a Coral record XAPI deletes at its next scan; waiting for it",
        doomed.len()
    );
    if xe.dry_run() {
        return Ok(());
    }
    if let Err(err) = xe.pusb_scan() {
        log::warn!("`xe pusb-scan` failed ({err}); waiting for XAPI's own scan");
    }
    let left = poll_scan(clock, scan_timeout, SCAN_FIRST_LOOK, |_| {
        let now = xe.vusbs_of_vm(plan.vm.uuid())?;
        Ok::<_, XeError>((now.len() < MAX_VUSBS_PER_VM).then_some(()))
    })
    .map_err(|e| xe_fail("listing the VM's VUSBs", e))?;
    match left {
        Some(()) => Ok(()),
        None => Err(fail(
            FailureKind::Timeout,
            format!(
                "{label} has {count} VUSBs, XAPI's limit, and XAPI did not delete the stale ones ({}) within {} s; `xe pusb-scan host-uuid={}`, then rerun",
                doomed.iter().map(|v| short(v)).collect::<Vec<_>>().join(", "),
                scan_timeout.as_secs_f64(),
                xe.host_uuid()
            ),
        )),
    }
}

/// The VM's VUSBs whose PUSB is a Coral identity on this host that the bus
/// no longer shows at that path: XAPI deletes them at its next scan. Only
/// Coral records are judged (the bus listing knows only Corals); any other
/// record counts.
fn doomed_vusbs(usb: &dyn UsbBus, xe: &XeClient, plan: &Plan) -> Vec<String> {
    let Ok(corals) = usb.list_corals() else {
        return Vec::new();
    };
    plan.vm_vusbs
        .iter()
        .filter(|vusb| {
            plan.pusbs.iter().any(|p| {
                p.group == vusb.group
                    && p.host == xe.host_uuid()
                    && coral_identity(p).is_some()
                    && !corals
                        .iter()
                        .any(|c| c.path.to_string() == p.path && Some(c.state) == coral_identity(p))
            })
        })
        .map(|v| v.uuid.clone())
        .collect()
}

/// The Coral identity a PUSB record stands for, if any.
fn coral_identity(pusb: &PusbInfo) -> Option<CoralState> {
    [CoralState::Uninitialized, CoralState::Ready]
        .into_iter()
        .find(|s| {
            let id = s.id();
            pusb.vendor_id == format!("{:04x}", id.vendor)
                && pusb.product_id == format!("{:04x}", id.product)
        })
}

/// Create the VUSB. When `vusb-create` outlives its deadline, xapi may still
/// create it: look for it (bounded) and adopt it, or say it may appear.
fn create_vusb(
    xe: &XeClient,
    clock: &dyn Clock,
    group: &str,
    vm_uuid: &str,
) -> anyhow::Result<String> {
    let err = match xe.vusb_create(group, vm_uuid) {
        Ok(uuid) => return Ok(uuid),
        Err(err) if err.is_timeout() => err,
        Err(err) => return Err(xe_fail("creating the VUSB", err)),
    };
    log::warn!("{err}; looking for the VUSB in XAPI");
    let found = follow_until(clock, FOLLOW_TIMEOUT, FOLLOW_POLL, || {
        xe.vusbs_of_group(group)
            .map(|v| v.into_iter().find(|v| v.vm_uuid == vm_uuid))
    })
    .map_err(|e| xe_fail("looking for the VUSB", e))?;
    match found {
        Some(vusb) => {
            log::info!("xapi created VUSB {} after all", short(&vusb.uuid));
            Ok(vusb.uuid)
        }
        None => Err(fail(
            FailureKind::Xapi,
            format!(
                "creating the VUSB: {err}; XAPI listed none within {} s but may still create it: `xe vusb-list usb-group-uuid={group}` shows it, and a rerun adopts it",
                FOLLOW_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// How a followed operation ended.
struct Followed {
    state: PowerState,
    /// Still running inside xapi after [`FOLLOW_TIMEOUT`].
    pending: bool,
}

/// Follow a VM's operations inside xapi until none is left, bounded (a stop
/// does not end it: the operation has begun).
fn follow(xe: &XeClient, clock: &dyn Clock, vm: &str) -> anyhow::Result<Followed> {
    let mut last = None;
    let done = follow_until(clock, FOLLOW_TIMEOUT, FOLLOW_POLL, || {
        let info = xe.vm(vm)?;
        let idle = info
            .as_ref()
            .is_none_or(|i| i.current_operations.is_empty());
        last = info.clone();
        Ok::<_, XeError>(idle.then_some(()))
    })
    .map_err(|e| xe_fail("following the VM's operation in XAPI", e))?;
    let state = last.map(|i| i.power_state).unwrap_or(PowerState::Halted);
    Ok(Followed {
        state,
        pending: done.is_none(),
    })
}

/// Why a shutdown did not bring the VM down.
enum NotDown {
    /// It is still running and xapi is not shutting it down.
    Running(String),
    /// xapi is still running a clean shutdown that cannot be cancelled.
    StillShuttingDown(String),
}

/// Clean shutdown (hard only with `--force-shutdown`, once the clean one
/// failed or outlived its deadline). Ok once the VM is halted.
fn shut_down(
    xe: &XeClient,
    clock: &dyn Clock,
    vm: &Vm,
    opts: &AttachOptions,
) -> anyhow::Result<Result<(), NotDown>> {
    let timeout = capped(clock, opts.shutdown_timeout);
    log::info!(
        "{} {} down cleanly (up to {} s)",
        verb(xe, "shutting", "would shut"),
        vm.label,
        timeout.as_secs()
    );
    let clean = match xe.vm_shutdown(vm.uuid(), false, timeout) {
        Ok(()) => return Ok(Ok(())),
        Err(err) => err,
    };
    if clean.api_code() == Some("OTHER_OPERATION_IN_PROGRESS") {
        return Ok(Err(NotDown::Running(format!(
            "another operation on it is in progress ({clean})"
        ))));
    }
    if clean.is_timeout() && !opts.force_shutdown {
        log::warn!(
            "{} did not shut down within {}; xapi goes on with the clean shutdown, following it (up to {} s)",
            vm.label,
            Flag::ShutdownTimeout,
            FOLLOW_TIMEOUT.as_secs()
        );
        let followed = follow(xe, clock, vm.uuid())?;
        return Ok(match followed {
            Followed {
                state: PowerState::Halted,
                ..
            } => Ok(()),
            Followed { pending: true, .. } => Err(NotDown::StillShuttingDown(clean.to_string())),
            _ => Err(NotDown::Running(format!(
                "{clean}; the clean shutdown then failed inside XAPI"
            ))),
        });
    }
    if !clean.is_timeout() {
        let now = xe
            .vm(vm.uuid())
            .map_err(|e| xe_fail("reading the VM's power state", e))?;
        if now
            .as_ref()
            .is_some_and(|i| i.power_state == PowerState::Halted)
        {
            return Ok(Ok(()));
        }
        if !opts.force_shutdown {
            return Ok(Err(NotDown::Running(clean.to_string())));
        }
    }
    log::warn!(
        "{} did not shut down cleanly ({clean}); forcing it off ({})",
        vm.label,
        Flag::ForceShutdown
    );
    match xe.vm_shutdown(vm.uuid(), true, CALL_TIMEOUT) {
        Ok(()) => Ok(Ok(())),
        Err(forced) => {
            let followed = follow(xe, clock, vm.uuid())?;
            if followed.state == PowerState::Halted {
                Ok(Ok(()))
            } else {
                Ok(Err(NotDown::Running(format!(
                    "{clean}; the hard shutdown failed too: {forced}"
                ))))
            }
        }
    }
}

/// Shut down (see [`shut_down`]), then start with the Coral. From the
/// moment the VM is down it is started again whatever fails.
fn restart_with_coral(
    xe: &XeClient,
    clock: &dyn Clock,
    vm: &Vm,
    vusb: &str,
    created: bool,
    opts: &AttachOptions,
    report: &mut AttachReport,
) -> anyhow::Result<()> {
    let label = &vm.label;
    // Under a deadline, the shutdown and its follow-up leave the start its reserve.
    let shutdown_clock = Bounded::new(
        clock,
        clock
            .deadline()
            .map_or(Duration::MAX, |d| d.saturating_sub(START_RESERVE)),
    );
    // Write-ahead: whoever runs next starts the VM if this run dies halfway.
    let intent = opts.intent.as_ref().filter(|_| !xe.dry_run());
    if let Some(store) = intent {
        if let Err(e) = store.record_intent(
            vm.uuid(),
            &format!(
                "{label}: clean shutdown to restart it with the Coral (VUSB {})",
                short(vusb)
            ),
        ) {
            log::warn!(
                "cannot record the restart of {label} in {} ({e}); if this run dies before {label} runs again, start it by hand",
                store.path().display()
            );
        }
    }
    let done = || {
        if let Some(store) = intent {
            clear_intent(store, vm.uuid());
        }
    };
    match shut_down(xe, &shutdown_clock, vm, opts)? {
        Ok(()) => {}
        Err(NotDown::Running(why)) => {
            done();
            if created {
                roll_back(xe, vusb);
            }
            return Err(fail_then(
                FailureKind::Vm,
                format!(
                    "{label} did not shut down cleanly ({why}); it is still running and unchanged"
                ),
                NextStep::LongerShutdownOrForce,
            ));
        }
        Err(NotDown::StillShuttingDown(why)) => {
            report.say(format!("kept VUSB {} for {label}", short(vusb)));
            return Err(fail_then(
                FailureKind::Vm,
                format!(
                    "{label} did not finish its clean shutdown ({why}) and XAPI is still shutting it down after {} s more (a clean shutdown cannot be cancelled): if it halts, it stays DOWN until started: `xe vm-start uuid={}` (its VUSB {} is kept, so it then has the Coral)",
                    FOLLOW_TIMEOUT.as_secs(),
                    vm.uuid(),
                    short(vusb),
                ),
                NextStep::ForceOffNow {
                    vm: vm.uuid().to_string(),
                },
            ));
        }
    }
    // Started (with or without the Coral) or reported DOWN with the
    // command: coral is done with it. Only a VM xapi cannot be asked about
    // now, or one still busy inside xapi, keeps it for the next run.
    match start_with_coral(xe, clock, vm, vusb, created, true) {
        Ok(()) => {
            done();
            Ok(())
        }
        Err(e) => match xe.vm(vm.uuid()) {
            Ok(Some(info)) if !info.current_operations.is_empty() => Err(e),
            Ok(_) => {
                done();
                Err(e)
            }
            Err(_) => Err(e),
        },
    }
}

/// Forget a VM's restart intent; a failure is only logged (the next run
/// finds the VM running and forgets it then).
pub fn clear_intent(store: &StateStore, vm_uuid: &str) {
    if let Err(e) = store.clear_intent(vm_uuid) {
        log::warn!(
            "cannot clear the restart recorded for VM {vm_uuid} in {}: {e}",
            store.path().display()
        );
    }
}

/// Start the VM; a start whose `xe` gave up is followed to its end.
fn start(xe: &XeClient, clock: &dyn Clock, vm: &str) -> anyhow::Result<Result<(), XeError>> {
    match xe.vm_start(vm) {
        Ok(()) => Ok(Ok(())),
        Err(err) if err.is_timeout() => {
            let followed = follow(xe, clock, vm)?;
            Ok(if followed.state == PowerState::Running {
                Ok(())
            } else {
                Err(err)
            })
        }
        Err(err) => Ok(Err(err)),
    }
}

/// Start with the Coral, retrying once (a transient failure must not lose
/// the Coral). If it still fails: a VM that was running is started without
/// the Coral (its VUSB removed, and the error says how to restore it); a VM
/// that was halted stays halted.
fn start_with_coral(
    xe: &XeClient,
    clock: &dyn Clock,
    vm: &Vm,
    vusb: &str,
    created: bool,
    was_running: bool,
) -> anyhow::Result<()> {
    let label = &vm.label;
    let first = match start(xe, clock, vm.uuid())? {
        Ok(()) => return Ok(()),
        Err(err) => err,
    };
    let usb_reset = is_usb_reset_failure(&first);
    if usb_reset {
        // xcp-ng/xcp#516: transient; let XAPI rescan and check the records
        // are still whole before the second try.
        log::warn!("starting {label} failed in XAPI's USB reset ({first}); rescanning USB and trying once more");
        recheck_after_reset_failure(xe, clock, vusb);
    } else {
        log::warn!("starting {label} with the Coral failed ({first}); trying once more");
    }
    let again = match start(xe, clock, vm.uuid())? {
        Ok(()) => {
            log::info!("{label} started with the Coral at the second try");
            return Ok(());
        }
        Err(err) => err,
    };
    if !was_running {
        if created {
            roll_back(xe, vusb);
        }
        return Err(fail(
            FailureKind::Xapi,
            format!(
                "starting {label} with the Coral failed twice ({again}); it stays halted{}{}; check `xe vm-start uuid={}` errors and dmesg, then rerun",
                if created { "" } else { " with its VUSB" },
                if usb_reset || is_usb_reset_failure(&again) { " (XAPI's USB reset of the Coral failed, xcp-ng/xcp#516: unplug and replug the Coral)" } else { "" },
                vm.uuid()
            ),
        ));
    }
    let fix = if usb_reset || is_usb_reset_failure(&again) {
        " (XAPI's USB reset of the Coral failed, xcp-ng/xcp#516: unplug and replug the Coral)"
    } else {
        ""
    };
    log::warn!("starting {label} without the Coral, so that it runs again");
    if let Err(err) = xe.vusb_destroy(vusb) {
        log::warn!("could not remove the Coral's VUSB {vusb}: {err}");
    }
    match start(xe, clock, vm.uuid())? {
        Ok(()) => Err(fail_then(
            FailureKind::Xapi,
            format!(
                "{label} would not start with the Coral ({again}), so it was started again without it and its VUSB {} was removed{fix} (see the `xe vm-start` errors, dmesg)",
                short(vusb),
            ),
            NextStep::RestorePassthrough {
                vm: vm.uuid().to_string(),
            },
        )),
        Err(down) => Err(fail(
            FailureKind::Vm,
            format!(
                "{label} is DOWN: it would not start with the Coral ({again}) nor without it ({down}); start it by hand: `xe vm-start uuid={}`",
                vm.uuid()
            ),
        )),
    }
}

/// `vm-start` failed in XAPI's USB reset of the device ("Call to usb reset
/// failed: Forkhelpers.Spawn_internal_error", an INTERNAL_ERROR; xapi-usb.md).
fn is_usb_reset_failure(err: &XeError) -> bool {
    match err {
        XeError::Api { code, params, .. } => {
            code == "INTERNAL_ERROR"
                && params
                    .iter()
                    .any(|p| p.to_ascii_lowercase().contains("usb reset failed"))
        }
        _ => false,
    }
}

/// After a failed USB reset: ask XAPI to scan, then wait (bounded) until
/// the VUSB's group holds a PUSB again (a scan may be replacing it). What
/// the second start finds decides; this only gives the scan its time.
fn recheck_after_reset_failure(xe: &XeClient, clock: &dyn Clock, vusb: &str) {
    if let Err(err) = xe.pusb_scan() {
        log::warn!("`xe pusb-scan` failed ({err})");
    }
    let group = match xe.param("vusb", vusb, "usb-group-uuid") {
        Ok(group) => group,
        Err(err) => {
            log::warn!("the Coral's VUSB {vusb} cannot be read any more ({err})");
            return;
        }
    };
    let whole = poll_scan(clock, RESET_RECHECK_TIMEOUT, SCAN_FIRST_LOOK, |_| {
        let members = xe.group_members(&group)?;
        Ok::<_, XeError>(
            members
                .filter(|(pusbs, vusbs)| !pusbs.is_empty() && vusbs.iter().any(|v| v == vusb))
                .map(|_| ()),
        )
    });
    match whole {
        Ok(Some(())) => log::info!("the Coral's records are whole; starting again"),
        Ok(None) => log::warn!("the Coral's USB group has no PUSB after the rescan"),
        Err(err) => log::warn!("checking the Coral's USB group: {err}"),
    }
}

/// Destroy the VUSB this run created, so a failed run leaves nothing behind.
fn roll_back(xe: &XeClient, uuid: &str) {
    match xe.vusb_destroy(uuid) {
        Ok(()) => log::info!("rolled back: destroyed VUSB {}", short(uuid)),
        Err(err) => log::warn!("could not destroy VUSB {uuid} created by this run: {err}"),
    }
}

/// What was done, or in a dry run what would be.
fn verb<'a>(xe: &XeClient, done: &'a str, planned: &'a str) -> &'a str {
    if xe.dry_run() {
        planned
    } else {
        done
    }
}

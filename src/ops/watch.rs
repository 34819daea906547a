//! `coral watch`: keep every Coral → VM mapping healthy for as long as the
//! host runs. A Coral that resets, vanishes or falls back to its boot
//! loader (coral-dfu.md, "Field facts") loses its PUSB, group and VUSB in
//! XAPI; the watcher notices and runs the `coral up` procedure again.
//!
//! What it reacts to:
//! - a USB change (a hotplug event, or a listing that differs from the last
//!   one): every mapping is checked at once;
//! - a periodic XAPI check (`xapi_check`), which finds a PUSB or VUSB that
//!   went without a USB change on this host (rare: XAPI removes them only
//!   when its scan sees the device changed or gone).
//!
//! What it never does: restart a running VM unless the mapping allows it
//! (and then at most `max_restarts_per_hour` shutdowns begun per VM, whatever
//! came of them), hard-stop a VM, touch a mapping an admin paused with
//! `coral detach`, run while another `coral` run holds the lock, or leave
//! halted a VM its own step halted (it is started again, without the Coral
//! if it must, before anything else and before the watcher exits), nor one
//! a killed run left halted mid-restart (its intent is recorded:
//! [`super::unfinished`]).
//!
//! Its lifetime: on a stop (SIGTERM, SIGINT) no new step begins; what has
//! begun is finished or undone, and a VM coral halted is started again. On
//! a reload (SIGHUP) the mappings are read again; a broken config keeps
//! the ones in use.

use super::attach::AttachOptions;
use super::bring_back::{bring_back, BroughtBack};
use super::unfinished::Finished;
use super::up::{up, UpOptions, UpReport};
use super::xapi_common::{guest_node, pusb_at, resolve_vm, xe_fail};
use crate::clock::Clock;
use crate::config::Deadlines;
use crate::error::NextStep;
use crate::firmware::FirmwareImage;
use crate::lock::LockGuard;
use crate::mapping_state::StateStore;
use crate::usb::{select_one, CoralDevice, CoralState, NodeCheck, UsbBus};
use crate::xe::client::PowerState;
use crate::xe::client::XeClient;
use std::collections::VecDeque;
use std::time::Duration;

/// The window of the restart rate limit.
pub const RESTART_WINDOW: Duration = Duration::from_secs(3600);
/// Default restarts allowed per VM per [`RESTART_WINDOW`].
pub const DEFAULT_MAX_RESTARTS_PER_HOUR: u32 = 2;
/// Default interval of the USB listing that backs up hotplug events.
pub const DEFAULT_USB_POLL: Duration = Duration::from_secs(2);
/// Default interval of the XAPI health check.
pub const DEFAULT_XAPI_CHECK: Duration = Duration::from_secs(60);
/// After a USB change, XAPI's own scans (udev-triggered, asynchronous) may
/// still remove records the check at once found: look again this much later.
pub const USB_SETTLE_RECHECK: Duration = Duration::from_secs(5);
/// First retry delay after a failed recovery; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Longest retry delay after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// After a stop (SIGTERM), the time what has begun may still take: a clean
/// shutdown in flight (its default deadline), its follow-up, and starting
/// the VM again. The units' `TimeoutStopSec` is this and a margin.
pub const STOP_BUDGET: Duration = Duration::from_secs(
    super::attach::DEFAULT_SHUTDOWN_TIMEOUT.as_secs()
        + super::attach::FOLLOW_TIMEOUT.as_secs()
        + 2 * super::attach::START_RESERVE.as_secs(),
);
/// Longest pause between USB listings while they keep failing (the first
/// pause is the poll interval; it doubles).
pub const MAX_LISTING_BACKOFF: Duration = Duration::from_secs(60);

/// One Coral → VM mapping to keep healthy.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    /// The VM: uuid (from the config) or exact name-label (from `--vm`).
    pub vm: String,
    /// Its name, for people (the config keeps it next to the uuid).
    pub name: Option<String>,
    /// The Coral's port chain; None: the only Coral on this host.
    pub device: Option<String>,
    /// Start the VM after recovery if it is halted.
    pub start: bool,
    /// Restart the running VM so it gets the Coral back (opt-in, rate-limited).
    pub restart: bool,
    /// The mapping's own deadlines (its config entry's), over the defaults.
    pub deadlines: Deadlines,
}

/// How the watcher behaves.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The mappings.
    pub mappings: Vec<Mapping>,
    /// Restarts allowed per VM per hour (for mappings that allow restarts).
    pub max_restarts_per_hour: u32,
    /// Interval of the USB listing that backs up hotplug events.
    pub usb_poll: Duration,
    /// Interval of the XAPI health check.
    pub xapi_check: Duration,
    /// Deadlines of the recovery (the `coral up` options; vm, device,
    /// start and restart are taken from each mapping).
    pub recovery: UpOptions,
}

/// Why the watcher woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// libusb or udev reported a device arriving or leaving.
    UsbChanged,
    /// The wait timed out.
    Timeout,
    /// SIGTERM or SIGINT: begin nothing new, finish what has begun, exit.
    Stop,
    /// SIGHUP: read the mappings again ([`Wakeups::reload`]).
    Reload,
}

/// Where wake-ups come from: hotplug events and signals (real), or a script (tests).
pub trait Wakeups {
    /// Wait up to `timeout` for an event.
    fn wait(&self, timeout: Duration) -> Wake;
    /// After [`Wake::Reload`]: the mappings as the config reads now (an
    /// error keeps the ones in use).
    fn reload(&self) -> anyhow::Result<Vec<Mapping>> {
        Err(anyhow::anyhow!("this watcher has no config to read again"))
    }
}

/// What the watcher needs from the host.
pub struct WatchEnv<'a> {
    /// This host's USB.
    pub usb: &'a dyn UsbBus,
    /// XAPI for this host.
    pub xe: &'a XeClient<'a>,
    /// Time.
    pub clock: &'a dyn Clock,
    /// The firmware image, loaded when a Coral needs it.
    pub load_firmware: &'a mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    /// Tries the lock shared with `coral up`, `attach` and `detach`.
    pub lock: &'a dyn Fn() -> anyhow::Result<LockAttempt>,
    /// Pauses and the record of actions.
    pub state: &'a StateStore,
}

/// The outcome of trying the shared lock.
pub enum LockAttempt {
    /// Held until dropped (None: nothing to hold, e.g. in a simulation).
    Held(Option<LockGuard>),
    /// Another `coral` run holds it; the watcher tries again later.
    Busy,
}

/// What the watcher knows about one mapping.
#[derive(Debug)]
struct Tracked {
    mapping: Mapping,
    /// The VM's uuid and name once resolved.
    vm: Option<(String, String)>,
    /// When restarts happened (for the rate limit).
    restarts: VecDeque<Duration>,
    /// Failed recoveries in a row.
    failures: u32,
    /// No recovery before this time (backoff after failures).
    retry_at: Duration,
    /// The last problem logged, so a lasting condition is logged once.
    last_note: Option<String>,
    /// The mapping's Coral as last seen on the bus.
    seen: Option<CoralDevice>,
    /// It re-enumerated as itself since (why), and the VM has not been
    /// restarted since: a drop XAPI does not see.
    reenumerated: Option<String>,
    /// The VM's domain when that was noticed (a new one: it restarted since).
    lost_domid: Option<u32>,
    /// A shutdown coral began did not end with the VM running again: it is
    /// started again before anything else ([`Watcher::restore`]).
    halted_by_us: bool,
}

impl Tracked {
    fn new(mapping: Mapping) -> Self {
        Tracked {
            mapping,
            vm: None,
            restarts: VecDeque::new(),
            failures: 0,
            retry_at: Duration::ZERO,
            last_note: None,
            seen: None,
            reenumerated: None,
            lost_domid: None,
            halted_by_us: false,
        }
    }
}

/// The health of a mapping whose Coral is ready.
#[derive(Debug, PartialEq, Eq)]
enum Health {
    /// The VM has the Coral (or gets it at its next start while halted).
    Healthy,
    /// The PUSB or the VM's VUSB is gone: run the recovery.
    Broken(String),
    /// The VUSB exists and the VM runs without it.
    PendingRestart,
    /// Another VM holds the Coral: not the watcher's to change.
    HeldByOther(String),
    /// XAPI shows the VUSB attached, yet the guest lost the Coral (why).
    Lost(String),
}

/// The watcher: one [`Tracked`] per mapping.
pub struct Watcher {
    tracked: Vec<Tracked>,
    max_restarts_per_hour: u32,
    recovery: UpOptions,
}

impl Watcher {
    /// A watcher for `opts.mappings`.
    pub fn new(opts: &WatchOptions) -> Self {
        Watcher {
            tracked: opts.mappings.iter().cloned().map(Tracked::new).collect(),
            max_restarts_per_hour: opts.max_restarts_per_hour,
            recovery: opts.recovery.clone(),
        }
    }

    /// The mappings of a reloaded config: a mapping kept (same VM) keeps
    /// what the watcher knows of it (restarts begun, a VM left halted).
    pub fn set_mappings(&mut self, mappings: Vec<Mapping>) {
        let mut old = std::mem::take(&mut self.tracked);
        for mapping in mappings {
            let kept = old.iter().position(|t| t.mapping.vm == mapping.vm);
            let tracked = match kept {
                Some(i) => {
                    let mut tracked = old.remove(i);
                    if tracked.mapping != mapping {
                        tracked.mapping = mapping;
                        tracked.vm = None;
                        tracked.last_note = None;
                    }
                    tracked
                }
                None => Tracked::new(mapping),
            };
            self.tracked.push(tracked);
        }
        // A mapping removed while coral had its VM down is kept until the
        // VM runs again: a reload never leaves a VM down.
        for tracked in old.into_iter().filter(|t| t.halted_by_us) {
            self.tracked.push(tracked);
        }
    }

    /// Before exiting on a stop: start again every VM coral left halted.
    pub fn finish(&mut self, env: &mut WatchEnv) {
        for index in 0..self.tracked.len() {
            if self.tracked[index].halted_by_us {
                self.restore(env, index);
            }
        }
    }

    /// A VM whose shutdown coral began and that did not run again after it:
    /// follow what xapi still does on it, then start it (without the Coral
    /// if it must), and say so.
    fn restore(&mut self, env: &mut WatchEnv, index: usize) {
        let Some((vm_uuid, vm_name)) = self.tracked[index].vm.clone() else {
            return;
        };
        let outcome = bring_back(env.xe, env.clock, &vm_uuid);
        if matches!(
            outcome,
            Ok(BroughtBack::Running { .. })
                | Ok(BroughtBack::StartedWithout { .. })
                | Ok(BroughtBack::Elsewise(_))
        ) {
            super::attach::clear_intent(env.state, &vm_uuid);
        }
        match outcome {
            Ok(BroughtBack::Running { started: false }) | Ok(BroughtBack::Elsewise(_)) => {
                self.tracked[index].halted_by_us = false;
            }
            Ok(BroughtBack::Running { started: true }) => {
                self.tracked[index].halted_by_us = false;
                let line = format!(
                    "{vm_name} was left halted by coral's own restart; started it again with its Coral"
                );
                log::warn!("watch: {line}");
                record(
                    env.state,
                    &self.tracked[index].mapping,
                    &vm_uuid,
                    &line,
                    true,
                );
            }
            Ok(BroughtBack::StartedWithout { removed }) => {
                self.tracked[index].halted_by_us = false;
                let line = format!(
                    "{vm_name} was left halted by coral's own restart and would not start with its Coral: started it without it (removed {} VUSB(s)); {}",
                    removed.len(),
                    NextStep::RestorePassthrough {
                        vm: vm_uuid.clone()
                    }
                );
                log::error!("watch: {line}");
                record(
                    env.state,
                    &self.tracked[index].mapping,
                    &vm_uuid,
                    &line,
                    false,
                );
            }
            Ok(BroughtBack::StillBusy) => {
                let line = format!(
                    "{vm_name}: xapi is still shutting it down (a clean shutdown cannot be cancelled); it is started when it halts"
                );
                self.note(index, line, log::Level::Warn);
                self.tracked[index].retry_at = env.clock.now() + FIRST_BACKOFF;
            }
            Err(e) => self.failed(env, index, &format!("starting it again: {e:#}")),
        }
    }

    /// Start every VM a previous run left halted mid-restart (its intent is
    /// still recorded: [`super::unfinished`]), under the shared lock; while
    /// another run holds it, that run may be mid-restart: left for later.
    fn finish_unfinished(&mut self, env: &mut WatchEnv) {
        if !super::unfinished::any(env.state) {
            return;
        }
        let _lock = match (env.lock)() {
            Ok(LockAttempt::Held(guard)) => guard,
            Ok(LockAttempt::Busy) => return,
            Err(e) => {
                log::warn!("watch: {e:#}; unfinished restarts are looked at again later");
                return;
            }
        };
        for (vm, outcome) in super::unfinished::finish_unfinished(env.xe, env.clock, env.state) {
            if matches!(outcome, Finished::Started | Finished::StartedWithout) {
                if let Some(tracked) = self
                    .tracked
                    .iter_mut()
                    .find(|t| t.vm.as_ref().is_some_and(|(uuid, _)| *uuid == vm))
                {
                    tracked.halted_by_us = false;
                }
            }
        }
    }

    /// Check every mapping once against `corals` (a fresh listing).
    /// `usb_changed`: the bus changed since the last check; `xapi_due`: the
    /// periodic XAPI check is due. A failure is logged and retried later
    /// with backoff; it never ends the watcher.
    pub fn check(
        &mut self,
        env: &mut WatchEnv,
        corals: &[CoralDevice],
        usb_changed: bool,
        xapi_due: bool,
    ) {
        let several_mappings = self.tracked.len() > 1;
        // First, a VM coral's own step left halted: never left down.
        for index in 0..self.tracked.len() {
            if self.tracked[index].halted_by_us && env.clock.now() >= self.tracked[index].retry_at {
                self.restore(env, index);
            }
        }
        // Then a VM a previous run (this watcher before a crash, a killed
        // `coral up` or `attach --restart`) halted and left down.
        self.finish_unfinished(env);
        for index in 0..self.tracked.len() {
            if env.clock.stop_requested() {
                return;
            }
            self.check_one(env, index, corals, usb_changed, xapi_due, several_mappings);
        }
    }

    fn check_one(
        &mut self,
        env: &mut WatchEnv,
        index: usize,
        corals: &[CoralDevice],
        usb_changed: bool,
        xapi_due: bool,
        several_mappings: bool,
    ) {
        let now = env.clock.now();
        let retry_due = self.tracked[index].failures > 0 && now >= self.tracked[index].retry_at;
        if now < self.tracked[index].retry_at && !usb_changed {
            return;
        }
        let Some((vm_uuid, vm_name)) = self.resolve(env, index) else {
            return;
        };
        if env.state.is_paused(&vm_uuid) {
            self.note(
                index,
                format!(
                    "{vm_name}: paused by a deliberate detach; {}",
                    NextStep::ResumeMapping {
                        vm: vm_uuid.clone()
                    }
                ),
                log::Level::Info,
            );
            return;
        }
        let device = self.tracked[index].mapping.device.clone();
        let coral = match (device.as_deref(), several_mappings) {
            (None, true) => {
                self.note(
                    index,
                    format!(
                        "{vm_name}: several mappings, so each needs its Coral's port ({})",
                        NextStep::DeviceForMapping {
                            vm: vm_uuid.clone()
                        }
                    ),
                    log::Level::Error,
                );
                return;
            }
            _ => select_one(corals, device.as_deref()).ok(),
        };
        let Some(coral) = coral else {
            self.note(
                index,
                format!(
                    "{vm_name}: its Coral{} is not on this host's USB; waiting for it",
                    device.map(|d| format!(" at {d}")).unwrap_or_default()
                ),
                log::Level::Warn,
            );
            return;
        };
        let first_look = self.note_enumeration(index, &coral);
        match coral.state {
            CoralState::Uninitialized => {
                let reason = format!(
                    "the Coral at {} is in its boot loader (1a6e:089a)",
                    coral.path
                );
                self.recover(env, index, &reason, &coral);
            }
            CoralState::Ready if usb_changed || xapi_due || retry_due => {
                let memory = self.lost_memory(env, index, &vm_uuid);
                let health = self.health(env, &coral, &vm_uuid, memory, first_look || usb_changed);
                if !matches!(health, Ok(Health::Lost(_)) | Err(_)) {
                    self.forget_reenumeration(index);
                }
                match health {
                    Ok(Health::Healthy) => {
                        let tracked = &mut self.tracked[index];
                        tracked.failures = 0;
                        if tracked.last_note.take().is_some() {
                            log::info!("watch: {vm_name} has its Coral at {}", coral.path);
                        }
                    }
                    Ok(Health::Broken(reason)) => self.recover(env, index, &reason, &coral),
                    Ok(Health::PendingRestart) => self.pending_restart(env, index, &coral),
                    Ok(Health::Lost(why)) => self.lost(env, index, &coral, &why),
                    Ok(Health::HeldByOther(other)) => {
                        self.note(
                            index,
                            format!("{vm_name}: the Coral at {} is passed through to VM {other}; left alone", coral.path),
                            log::Level::Warn,
                        );
                    }
                    Err(e) => self.failed(env, index, &format!("checking XAPI: {e:#}")),
                }
            }
            CoralState::Ready => {}
        }
    }

    /// The mapping's VM uuid and name, resolved once XAPI answers.
    fn resolve(&mut self, env: &mut WatchEnv, index: usize) -> Option<(String, String)> {
        if let Some(vm) = &self.tracked[index].vm {
            return Some(vm.clone());
        }
        match resolve_vm(env.xe, &self.tracked[index].mapping.vm) {
            Ok(vm) => {
                let label = match &self.tracked[index].mapping.name {
                    Some(name) if !name.is_empty() => format!("VM '{name}'"),
                    _ => vm.label.clone(),
                };
                let resolved = (vm.uuid().to_string(), label);
                self.tracked[index].vm = Some(resolved.clone());
                Some(resolved)
            }
            Err(e) => {
                let spec = self.tracked[index].mapping.vm.clone();
                self.failed(env, index, &format!("looking up VM '{spec}': {e:#}"));
                None
            }
        }
    }

    /// Remember the mapping's Coral; a ready Coral back at the same port
    /// with the same identity and a new device number re-enumerated as
    /// itself. True at the first look (nothing remembered yet).
    fn note_enumeration(&mut self, index: usize, coral: &CoralDevice) -> bool {
        let tracked = &mut self.tracked[index];
        let first = tracked.seen.is_none();
        if let Some(seen) = &tracked.seen {
            if coral.state == CoralState::Ready
                && seen.state == CoralState::Ready
                && seen.path == coral.path
                && seen.address != coral.address
            {
                tracked.reenumerated = Some(format!(
                    "the Coral at {} re-enumerated as itself (device {:03} -> {:03}) while attached",
                    coral.path, seen.address, coral.address
                ));
            }
        }
        if coral.state != CoralState::Ready {
            tracked.reenumerated = None;
            tracked.lost_domid = None;
        }
        tracked.seen = Some(coral.clone());
        first
    }

    /// What the watcher remembers of a re-enumeration under the VM, unless
    /// the VM got a new domain since (it restarted, and holds the new node).
    fn lost_memory(&mut self, env: &WatchEnv, index: usize, vm_uuid: &str) -> Option<String> {
        let why = self.tracked[index].reenumerated.clone()?;
        let domid = env.xe.dom_id(vm_uuid).ok().flatten();
        match self.tracked[index].lost_domid {
            None => self.tracked[index].lost_domid = domid,
            Some(then) if domid.is_some_and(|now| now != then) => {
                self.forget_reenumeration(index);
                return None;
            }
            Some(_) => {}
        }
        Some(why)
    }

    fn forget_reenumeration(&mut self, index: usize) {
        self.tracked[index].reenumerated = None;
        self.tracked[index].lost_domid = None;
    }

    /// The running VM lost its Coral: restart it if the mapping allows and
    /// the budget has room, else one line naming the VM, the port, why, and
    /// the command that restarts it.
    fn lost(&mut self, env: &mut WatchEnv, index: usize, coral: &CoralDevice, why: &str) {
        let (vm_uuid, vm_name) = self.tracked[index].vm.clone().unwrap_or_default();
        self.tracked[index].reenumerated = Some(why.to_string());
        if self.restart_allowed(env.clock.now(), index) {
            let reason = format!("{vm_name} lost its Coral: {why}");
            self.recover(env, index, &reason, coral);
            return;
        }
        let not = self.why_no_restart(index);
        let line = format!(
            "{vm_name} lost its Coral at {}: {why}; XAPI still shows it attached, and only a VM restart gives it back ({not}); {}",
            coral.path,
            NextStep::RestartNow {
                vm: vm_uuid.to_string()
            }
        );
        if self.note(index, line.clone(), log::Level::Warn) {
            record(
                env.state,
                &self.tracked[index].mapping,
                &vm_uuid,
                &line,
                true,
            );
        }
    }

    /// Read the Coral's PUSB and VUSB: 2 `xe` calls, 3 when the VUSB is not
    /// attached; when attached and `look` (first look, or the bus changed)
    /// or a `memory` of a re-enumeration, one more (`dom-id`) for the
    /// stateless check.
    fn health(
        &self,
        env: &WatchEnv,
        coral: &CoralDevice,
        vm_uuid: &str,
        memory: Option<String>,
        look: bool,
    ) -> anyhow::Result<Health> {
        let pusbs = env
            .xe
            .ready_pusbs()
            .map_err(|e| xe_fail("listing this host's Corals in XAPI", e))?;
        let path = coral.path.to_string();
        let Some(pusb) = pusb_at(&pusbs, env.xe.host_uuid(), &path, &[]) else {
            return Ok(Health::Broken(format!(
                "XAPI lists no PUSB for the Coral at {}",
                coral.path
            )));
        };
        let vusbs = env
            .xe
            .vusbs_of_group(&pusb.group)
            .map_err(|e| xe_fail("listing the Coral's VUSBs", e))?;
        if let Some(other) = vusbs.iter().find(|v| v.vm_uuid != vm_uuid) {
            return Ok(Health::HeldByOther(other.vm_uuid.clone()));
        }
        let Some(vusb) = vusbs.first() else {
            return Ok(Health::Broken(format!(
                "the Coral at {} has no VUSB for the VM",
                coral.path
            )));
        };
        if vusb.attached {
            if memory.is_none() && !look {
                return Ok(Health::Healthy);
            }
            // QEMU's marks decide where the host has them; the watcher's
            // own sighting counts where they tell nothing.
            return Ok(match guest_node(env.usb, env.xe, vm_uuid, &path) {
                NodeCheck::Lost { node } => Health::Lost(format!(
                    "the Coral at {path} re-enumerated as {node} after the VM started, and QEMU still holds the old node"
                )),
                NodeCheck::Given => Health::Healthy,
                NodeCheck::Unknown(_) => memory.map_or(Health::Healthy, Health::Lost),
            });
        }
        let vm = env
            .xe
            .vm(vm_uuid)
            .map_err(|e| xe_fail("reading the VM's power state", e))?;
        Ok(match vm.map(|vm| vm.power_state) {
            Some(PowerState::Running) => Health::PendingRestart,
            _ => Health::Healthy,
        })
    }

    /// The VM runs without its Coral: restart it if the mapping allows and
    /// the rate limit has room, else say once what would do it.
    fn pending_restart(&mut self, env: &mut WatchEnv, index: usize, coral: &CoralDevice) {
        let (vm_uuid, vm_name) = self.tracked[index].vm.clone().unwrap_or_default();
        if self.restart_allowed(env.clock.now(), index) {
            let reason = format!("{vm_name} runs without the Coral at {}", coral.path);
            self.recover(env, index, &reason, coral);
        } else {
            self.warn_pending(env, index, &vm_uuid, &vm_name);
        }
    }

    /// Why the watcher does not restart the mapping's VM now: the mapping
    /// does not allow it, or its hourly budget is spent.
    fn why_no_restart(&self, index: usize) -> String {
        if self.tracked[index].mapping.restart {
            format!(
                "restart limit of {} per hour reached",
                self.max_restarts_per_hour
            )
        } else {
            "restarts not allowed for this mapping".to_string()
        }
    }

    fn warn_pending(&mut self, env: &WatchEnv, index: usize, vm_uuid: &str, vm_name: &str) {
        let why = self.why_no_restart(index);
        let line = format!(
            "pending restart: {vm_name} gets its Coral at its next start ({why}); {}",
            NextStep::RestartNow {
                vm: vm_uuid.to_string()
            }
        );
        if self.note(index, line.clone(), log::Level::Warn) {
            record(
                env.state,
                &self.tracked[index].mapping,
                vm_uuid,
                &line,
                true,
            );
        }
    }

    fn restart_allowed(&mut self, now: Duration, index: usize) -> bool {
        let tracked = &mut self.tracked[index];
        while tracked
            .restarts
            .front()
            .is_some_and(|at| now.saturating_sub(*at) >= RESTART_WINDOW)
        {
            tracked.restarts.pop_front();
        }
        tracked.mapping.restart && (tracked.restarts.len() as u32) < self.max_restarts_per_hour
    }

    /// Run the `coral up` procedure for one mapping, under the lock.
    fn recover(&mut self, env: &mut WatchEnv, index: usize, reason: &str, coral: &CoralDevice) {
        let (vm_uuid, vm_name) = self.tracked[index].vm.clone().unwrap_or_default();
        let restart = self.restart_allowed(env.clock.now(), index);
        let _lock = match (env.lock)() {
            Ok(LockAttempt::Held(guard)) => guard,
            Ok(LockAttempt::Busy) => {
                log::info!(
                    "watch: another coral run holds the lock; checking {vm_name} again after it"
                );
                self.tracked[index].retry_at = env.clock.now() + FIRST_BACKOFF;
                self.tracked[index].failures = self.tracked[index].failures.max(1);
                return;
            }
            Err(e) => return self.failed(env, index, &format!("{e:#}")),
        };
        // The lock may have waited for a `coral detach`: look at the pause again.
        if env.state.is_paused(&vm_uuid) {
            return;
        }
        let recovering = if self.recovery.dry_run {
            "would recover"
        } else {
            "recovering"
        };
        log::warn!("watch: {reason}; {recovering} {vm_name}");
        let mapping = &self.tracked[index].mapping;
        let own = Deadlines::or;
        let opts = UpOptions {
            replug_timeout: own(
                mapping.deadlines.replug_timeout,
                self.recovery.replug_timeout,
            ),
            attach: AttachOptions {
                vm: vm_uuid.clone(),
                device: Some(coral.path.to_string()),
                start: mapping.start,
                restart,
                force_shutdown: false,
                shutdown_timeout: own(
                    mapping.deadlines.shutdown_timeout,
                    self.recovery.attach.shutdown_timeout,
                ),
                scan_timeout: own(
                    mapping.deadlines.scan_timeout,
                    self.recovery.attach.scan_timeout,
                ),
                guest_lost: self.tracked[index].reenumerated.is_some(),
                intent: Some(env.state.clone()),
            },
            ..self.recovery.clone()
        };
        // One journal line per action: the procedure's own steps are details
        // (shown with -v); its warnings and errors still show.
        let level = log::max_level();
        if level == log::LevelFilter::Info {
            log::set_max_level(log::LevelFilter::Warn);
        }
        let shutdowns = env.xe.shutdowns_begun();
        let outcome = up(env.usb, env.xe, env.clock, env.load_firmware, &opts);
        log::set_max_level(level);
        // Every shutdown begun counts against the budget, whatever came of it.
        let begun = env.xe.shutdowns_begun().saturating_sub(shutdowns);
        let now = env.clock.now();
        for _ in 0..begun {
            self.tracked[index].restarts.push_back(now);
        }
        match outcome {
            Ok(report) => self.recovered(env, index, &report),
            Err(e)
                if crate::clock::is_stopped(&e) || (begun == 0 && env.clock.stop_requested()) =>
            {
                log::info!(
                    "watch: {vm_name}: {e:#}; the recovery resumes when the watcher runs again"
                );
            }
            Err(e) => {
                if begun > 0 {
                    // Coral's own step may have left the VM halted: look and
                    // start it again (now, and at every check until it runs).
                    self.tracked[index].halted_by_us = true;
                }
                self.failed(env, index, &format!("recovery failed: {e:#}"));
                if begun > 0 {
                    self.tracked[index].retry_at = now;
                    self.restore(env, index);
                }
            }
        }
    }

    fn recovered(&mut self, env: &mut WatchEnv, index: usize, report: &UpReport) {
        let (vm_uuid, vm_name) = self.tracked[index].vm.clone().unwrap_or_default();
        let tracked = &mut self.tracked[index];
        tracked.failures = 0;
        tracked.retry_at = Duration::ZERO;
        tracked.last_note = None;
        // (The restart budget was charged when the shutdown began.)
        if report.attach.as_ref().is_some_and(|a| a.restarted) {
            tracked.reenumerated = None;
            tracked.lost_domid = None;
        }
        let line = format!("{vm_name}: {report}");
        log::info!("watch: {line}");
        record(env.state, &tracked.mapping, &vm_uuid, &line, true);
        if report.attach.as_ref().is_some_and(|a| a.pending_restart) {
            self.warn_pending(env, index, &vm_uuid, &vm_name);
        }
    }

    fn failed(&mut self, env: &mut WatchEnv, index: usize, what: &str) {
        let now = env.clock.now();
        let tracked = &mut self.tracked[index];
        tracked.failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << tracked.failures.saturating_sub(1).min(10))
            .min(MAX_BACKOFF);
        tracked.retry_at = now + backoff;
        let (vm_uuid, vm_name) = tracked
            .vm
            .clone()
            .unwrap_or_else(|| (tracked.mapping.vm.clone(), tracked.mapping.vm.clone()));
        let line = format!("{vm_name}: {what}; retrying in {} s", backoff.as_secs());
        log::error!("watch: {line}");
        record(env.state, &tracked.mapping, &vm_uuid, &line, false);
    }

    /// Log a lasting condition once (again only when it changes); true when logged.
    fn note(&mut self, index: usize, line: String, level: log::Level) -> bool {
        let tracked = &mut self.tracked[index];
        if tracked.last_note.as_deref() == Some(line.as_str()) {
            return false;
        }
        log::log!(level, "watch: {line}");
        tracked.last_note = Some(line);
        true
    }
}

/// The VM's name as people know it, for the record: the config's, else the
/// name `--vm` gave (nothing when `--vm` gave a uuid).
fn plain_name(mapping: &Mapping) -> String {
    match &mapping.name {
        Some(name) if !name.is_empty() => name.clone(),
        _ if crate::xe::looks_like_uuid(&mapping.vm) => String::new(),
        _ => mapping.vm.clone(),
    }
}

/// Record the watcher's action for `mapping`'s VM (named as people know it).
fn record(state: &StateStore, mapping: &Mapping, vm_uuid: &str, line: &str, ok: bool) {
    if let Err(e) = state.record_action(vm_uuid, &plain_name(mapping), line, ok) {
        log::warn!(
            "cannot record the watcher's action in {}: {e}",
            state.path().display()
        );
    }
}

/// Watch until a stop is requested: check at start, on every USB change,
/// and when the periodic XAPI check is due. Returns when `wakeups` says Stop.
pub fn watch(env: &mut WatchEnv, wakeups: &dyn Wakeups, opts: &WatchOptions) {
    let mut watcher = Watcher::new(opts);
    log::info!(
        "watch: keeping {} mapping(s) healthy (USB events, XAPI check every {} s)",
        opts.mappings.len(),
        opts.xapi_check.as_secs()
    );
    let mut usb = UsbView::default();
    let mut last_seen = usb.list(env.usb, env.clock.now(), opts.usb_poll);
    if let Some(corals) = &last_seen {
        watcher.check(env, corals, true, true);
    }
    let mut next_xapi_check = env.clock.now() + opts.xapi_check;
    loop {
        let now = env.clock.now();
        // While listings fail, the next one waits for its backoff (a USB
        // event still wakes the watcher at once): no spinning.
        let timeout = match usb.retry_at {
            Some(at) => at.saturating_sub(now),
            None => opts.usb_poll.min(next_xapi_check.saturating_sub(now)),
        };
        let wake = wakeups.wait(timeout);
        if wake == Wake::Stop || env.clock.stop_requested() {
            log::info!("watch: stopping");
            watcher.finish(env);
            return;
        }
        let mut reloaded = false;
        if wake == Wake::Reload {
            match wakeups.reload() {
                Ok(mappings) => {
                    log::info!(
                        "watch: config read again: keeping {} mapping(s) healthy",
                        mappings.len()
                    );
                    watcher.set_mappings(mappings);
                    reloaded = true;
                }
                Err(e) => log::error!(
                    "watch: reading the config again failed ({e:#}); keeping the mappings in use"
                ),
            }
        }
        let Some(corals) = usb.list(env.usb, env.clock.now(), opts.usb_poll) else {
            continue;
        };
        let usb_changed =
            wake == Wake::UsbChanged || reloaded || last_seen.as_ref() != Some(&corals);
        last_seen = Some(corals.clone());
        let now = env.clock.now();
        let xapi_due = now >= next_xapi_check;
        if usb_changed || xapi_due || watcher.retry_pending(now) {
            watcher.check(env, &corals, usb_changed, xapi_due);
        }
        if xapi_due {
            next_xapi_check = env.clock.now() + opts.xapi_check;
        }
        if usb_changed {
            next_xapi_check = next_xapi_check.min(env.clock.now() + USB_SETTLE_RECHECK);
        }
    }
}

/// USB listings for the watcher, saying once (not every poll) that they
/// fail, and backing off while they do.
#[derive(Default)]
struct UsbView {
    /// Listings failed in a row.
    failures: u32,
    /// While listings fail: no listing before this (unless a USB event).
    retry_at: Option<Duration>,
}

impl UsbView {
    fn list(
        &mut self,
        usb: &dyn UsbBus,
        now: Duration,
        poll: Duration,
    ) -> Option<Vec<CoralDevice>> {
        match usb.list_corals() {
            Ok(corals) => {
                self.retry_at = None;
                if std::mem::take(&mut self.failures) > 0 {
                    log::info!("watch: USB listings work again");
                }
                Some(corals)
            }
            Err(e) => {
                if self.failures == 0 {
                    log::warn!(
                        "watch: listing USB devices failed ({e}); trying again, less often while it fails (up to every {} s)",
                        MAX_LISTING_BACKOFF.as_secs()
                    );
                }
                let pause = poll
                    .max(Duration::from_millis(1))
                    .saturating_mul(1 << self.failures.min(10))
                    .min(MAX_LISTING_BACKOFF);
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(now.saturating_add(pause));
                None
            }
        }
    }
}

impl Watcher {
    /// True when a failed mapping's retry time has come.
    fn retry_pending(&self, now: Duration) -> bool {
        self.tracked
            .iter()
            .any(|t| t.failures > 0 && now >= t.retry_at)
    }
}

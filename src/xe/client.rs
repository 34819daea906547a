//! Typed XAPI calls on top of an [`XeRunner`], scoped to this host. Each is
//! one `xe` invocation. Decisions rest only on output that user-controlled
//! text cannot fake: `params=` lists of fields that hold no free text (uuids,
//! enums, booleans, sysfs paths), read strictly, and `param-get` by uuid.
//! No argument may hold a line break (xe would split it). Failures stay
//! typed ([`XeError`]) for the procedures to decide on.

use super::parse::{set_items, strict_records, Record};
use super::{display_args, looks_like_uuid, StartedCall, XeError, XeRunner};
use crate::clock::Clock;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Deadline of a read or a quick write.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command waits for xapi while it is down or still starting,
/// unless told otherwise (the boot path has its own budget).
pub const DEFAULT_XAPI_WAIT: Duration = Duration::from_secs(120);
/// Deadline of `vm-start` (a VM boot with its devices).
pub const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest pause between two tries while xapi is down or starting.
const XAPI_RETRY_MAX: Duration = Duration::from_secs(5);
/// First pause while xapi is down or starting (doubles up to the max).
const XAPI_RETRY_FIRST: Duration = Duration::from_millis(500);

/// A VM's power state, as XAPI names it (and `status --json` spells it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// `halted`
    Halted,
    /// `paused`
    Paused,
    /// `running`
    Running,
    /// `suspended`
    Suspended,
}

impl PowerState {
    /// XAPI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Halted => "halted",
            PowerState::Paused => "paused",
            PowerState::Running => "running",
            PowerState::Suspended => "suspended",
        }
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PowerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "halted" => PowerState::Halted,
            "paused" => PowerState::Paused,
            "running" => PowerState::Running,
            "suspended" => PowerState::Suspended,
            other => return Err(format!("unknown power-state {other:?}")),
        })
    }
}

/// A PUSB, anywhere in the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PusbInfo {
    /// PUSB uuid.
    pub uuid: String,
    /// Its USB group.
    pub group: String,
    /// The host it is plugged into.
    pub host: String,
    /// sysfs port path.
    pub path: String,
    /// vendor-id (4 hex digits).
    pub vendor_id: String,
    /// product-id (4 hex digits).
    pub product_id: String,
    /// passthrough-enabled.
    pub passthrough: bool,
}

impl PusbInfo {
    /// A ready Coral (18d1:9302).
    pub fn is_ready_coral(&self) -> bool {
        self.vendor_id == "18d1" && self.product_id == "9302"
    }
}

/// A VUSB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VusbInfo {
    /// VUSB uuid.
    pub uuid: String,
    /// Its VM.
    pub vm_uuid: String,
    /// Its USB group.
    pub group: String,
    /// currently-attached.
    pub attached: bool,
}

/// A USB group's PUSB uuids and VUSB uuids.
pub type GroupMembers = (Vec<String>, Vec<String>);

/// A VM, as far as decisions go (its name is free text, read apart).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    /// uuid.
    pub uuid: String,
    /// power-state.
    pub power_state: PowerState,
    /// The host it runs on (None when halted).
    pub resident_on: Option<String>,
    /// ha-restart-priority.
    pub ha_restart_priority: String,
    /// Operations xapi runs on it now (`clean_shutdown`, `start` …).
    pub current_operations: Vec<String>,
    /// dom-id: its running domain (None without one: `-1`).
    pub dom_id: Option<u32>,
}

const VM_FIELDS: &[&str] = &[
    "uuid",
    "power-state",
    "current-operations",
    "resident-on",
    "ha-restart-priority",
    "dom-id",
];
const PUSB_FIELDS: &[&str] = &[
    "uuid",
    "usb-group-uuid",
    "host-uuid",
    "path",
    "vendor-id",
    "product-id",
    "passthrough-enabled",
];
const VUSB_FIELDS: &[&str] = &["uuid", "vm-uuid", "usb-group-uuid", "currently-attached"];

/// Typed `xe` calls for this host. In dry-run mode mutating calls are not
/// run but recorded (and logged) exactly as they would run.
pub struct XeClient<'a> {
    runner: &'a dyn XeRunner,
    host_uuid: String,
    dry_run: bool,
    planned: RefCell<Vec<String>>,
    wait: Option<(&'a dyn Clock, Duration)>,
    said_waiting: Cell<bool>,
    bound: Option<&'a dyn Clock>,
    shutdowns: Cell<u32>,
}

impl<'a> XeClient<'a> {
    /// A client for the host with `host_uuid`; it does not wait for xapi.
    pub fn new(runner: &'a dyn XeRunner, host_uuid: String, dry_run: bool) -> Self {
        XeClient {
            runner,
            host_uuid,
            dry_run,
            planned: RefCell::new(Vec::new()),
            wait: None,
            said_waiting: Cell::new(false),
            bound: None,
            shutdowns: Cell::new(0),
        }
    }

    /// Cut every call's timeout so that it ends by `clock`'s deadline (the
    /// boot budget); a call with no time left is not run (it times out).
    pub fn bounded_by(mut self, clock: &'a dyn Clock) -> Self {
        self.bound = Some(clock);
        self
    }

    /// How many `vm-shutdown` calls this client has begun (whatever came of
    /// them): the watcher's restart budget counts attempts.
    pub fn shutdowns_begun(&self) -> u32 {
        self.shutdowns.get()
    }

    /// While xapi is down or starting (and only then), retry each call with
    /// backoff for up to `timeout` on `clock`.
    pub fn waiting_for_xapi(mut self, clock: &'a dyn Clock, timeout: Duration) -> Self {
        self.wait = Some((clock, timeout));
        self
    }

    /// This host's uuid.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// True in dry-run mode.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// In dry-run mode: the mutating commands that would have run, each as
    /// `xe <args>` quoted for a shell user.
    pub fn planned_commands(&self) -> Vec<String> {
        self.planned.borrow().clone()
    }

    // -- reads --------------------------------------------------------------

    /// The VMs (never templates, snapshots or control domains) whose uuid
    /// is `spec`, else whose name-label is exactly `spec`.
    pub fn find_vms(&self, spec: &str) -> Result<Vec<VmInfo>, XeError> {
        if looks_like_uuid(spec) {
            let by_uuid = self.vm_list(&[format!("uuid={spec}")])?;
            if !by_uuid.is_empty() {
                return Ok(by_uuid);
            }
        }
        self.vm_list(&[format!("name-label={spec}")])
    }

    /// Every VM's uuid (never templates, snapshots or control domains): one call.
    pub fn vm_uuids(&self) -> Result<Vec<String>, XeError> {
        Ok(self.vm_list(&[])?.into_iter().map(|vm| vm.uuid).collect())
    }

    /// The VM with this uuid now (None if it no longer exists).
    pub fn vm(&self, uuid: &str) -> Result<Option<VmInfo>, XeError> {
        Ok(self.vm_list(&[format!("uuid={uuid}")])?.into_iter().next())
    }

    fn vm_list(&self, filters: &[String]) -> Result<Vec<VmInfo>, XeError> {
        let args = vm_list_args(filters);
        parse_vms(&args, &self.read(&args)?)
    }

    /// One field of one object by uuid, verbatim (for names in messages).
    pub fn param(&self, class: &str, uuid: &str, field: &str) -> Result<String, XeError> {
        let out = self.read(&[
            format!("{class}-param-get"),
            format!("uuid={uuid}"),
            format!("param-name={field}"),
        ])?;
        Ok(out.strip_suffix('\n').unwrap_or(&out).to_string())
    }

    /// The domain id of a running VM (None when it has none: halted, `-1`).
    pub fn dom_id(&self, vm_uuid: &str) -> Result<Option<u32>, XeError> {
        let text = self.param("vm", vm_uuid, "dom-id")?;
        Ok(text.trim().parse::<u32>().ok())
    }

    /// Every PUSB of the pool.
    pub fn pusbs(&self) -> Result<Vec<PusbInfo>, XeError> {
        self.pusb_list(&[])
    }

    /// Every ready Coral (18d1:9302) XAPI lists on this host.
    pub fn ready_pusbs(&self) -> Result<Vec<PusbInfo>, XeError> {
        self.pusb_list(&[
            format!("host-uuid={}", self.host_uuid),
            "vendor-id=18d1".into(),
            "product-id=9302".into(),
        ])
    }

    fn pusb_list(&self, filters: &[String]) -> Result<Vec<PusbInfo>, XeError> {
        let args = pusb_list_args(filters);
        parse_pusbs(&args, &self.read(&args)?)
    }

    /// The VUSBs of a VM.
    pub fn vusbs_of_vm(&self, vm_uuid: &str) -> Result<Vec<VusbInfo>, XeError> {
        self.vusb_list(&format!("vm-uuid={vm_uuid}"))
    }

    /// The VUSBs on a USB group (XAPI allows at most one).
    pub fn vusbs_of_group(&self, group: &str) -> Result<Vec<VusbInfo>, XeError> {
        self.vusb_list(&format!("usb-group-uuid={group}"))
    }

    fn vusb_list(&self, filter: &str) -> Result<Vec<VusbInfo>, XeError> {
        let args = vusb_list_args(Some(filter));
        parse_vusbs(&args, &self.read(&args)?)
    }

    // -- reads started now, collected later ----------------------------------

    /// Start the lookup of [`XeClient::find_vms`] (by uuid when `spec` looks
    /// like one, else by name); [`XeClient::finish_vms`] collects it.
    pub fn start_find_vms(&self, spec: &str) -> StartedVms<'a> {
        let filter = if looks_like_uuid(spec) {
            format!("uuid={spec}")
        } else {
            format!("name-label={spec}")
        };
        StartedVms {
            spec: spec.to_string(),
            read: self.start(vm_list_args(&[filter]), parse_vms),
        }
    }

    /// The answer of [`XeClient::start_find_vms`]; a uuid-like `spec` that
    /// is no VM's uuid is then looked up as a name, as `find_vms` does.
    pub fn finish_vms(&self, started: StartedVms<'a>) -> Result<Vec<VmInfo>, XeError> {
        let found = self.finish(started.read)?;
        if found.is_empty() && looks_like_uuid(&started.spec) {
            return self.vm_list(&[format!("name-label={}", started.spec)]);
        }
        Ok(found)
    }

    /// Start listing every PUSB of the pool (as [`XeClient::pusbs`]).
    pub fn start_pusbs(&self) -> Started<'a, Vec<PusbInfo>> {
        self.start(pusb_list_args(&[]), parse_pusbs)
    }

    /// Start listing the VUSBs of the VM with this uuid, or (None: its uuid
    /// is not known yet) every VUSB of the pool, to be filtered by the
    /// caller on `vm_uuid`.
    pub fn start_vusbs(&self, vm_uuid: Option<&str>) -> Started<'a, Vec<VusbInfo>> {
        let filter = vm_uuid.map(|uuid| format!("vm-uuid={uuid}"));
        self.start(vusb_list_args(filter.as_deref()), parse_vusbs)
    }

    /// Collect a started read. While xapi is down or starting it is run
    /// again the way every call is (waiting for xapi, when this client does).
    pub fn finish<T>(&self, started: Started<'a, T>) -> Result<T, XeError> {
        let answer = match started.call {
            Ok(call) => match call.wait() {
                Err(err) if err.is_unavailable() && self.wait.is_some() => {
                    self.call(&started.args, CALL_TIMEOUT)
                }
                other => other,
            },
            Err(err) => Err(err),
        };
        (started.parse)(&started.args, &answer?)
    }

    fn start<T>(
        &self,
        args: Vec<String>,
        parse: fn(&[String], &str) -> Result<T, XeError>,
    ) -> Started<'a, T> {
        let call = match args.iter().find(|a| a.contains(['\n', '\r'])) {
            Some(arg) => Err(XeError::BadArgument { arg: arg.clone() }),
            None => Ok(self.runner.start(&args, CALL_TIMEOUT)),
        };
        Started { args, call, parse }
    }

    /// A USB group's PUSBs and VUSBs now (None: the group is gone).
    pub fn group_members(&self, group: &str) -> Result<Option<GroupMembers>, XeError> {
        let fields = &["uuid", "PUSB-uuids", "VUSB-uuids"];
        let args = vec![
            "usb-group-list".to_string(),
            format!("uuid={group}"),
            format!("params={}", fields.join(",")),
        ];
        let records = self.read_records(&args, fields)?;
        Ok(records.first().map(|r| {
            (
                set_items(&get(r, "PUSB-uuids")),
                set_items(&get(r, "VUSB-uuids")),
            )
        }))
    }

    // -- writes -------------------------------------------------------------

    /// Ask XAPI to rescan this host's USB devices (returns at once).
    pub fn pusb_scan(&self) -> Result<(), XeError> {
        self.write(
            &["pusb-scan".into(), format!("host-uuid={}", self.host_uuid)],
            CALL_TIMEOUT,
        )
        .map(drop)
    }

    /// Enable passthrough on a PUSB.
    pub fn enable_passthrough(&self, pusb: &str) -> Result<(), XeError> {
        self.write(
            &[
                "pusb-param-set".into(),
                format!("uuid={pusb}"),
                "passthrough-enabled=true".into(),
            ],
            CALL_TIMEOUT,
        )
        .map(drop)
    }

    /// Create a VUSB; returns its uuid (a placeholder in a dry run).
    pub fn vusb_create(&self, group: &str, vm_uuid: &str) -> Result<String, XeError> {
        let args = [
            "vusb-create".to_string(),
            format!("usb-group-uuid={group}"),
            format!("vm-uuid={vm_uuid}"),
        ];
        let Some(out) = self.write(&args, CALL_TIMEOUT)? else {
            return Ok("<new VUSB>".into());
        };
        let uuid = out.trim().to_string();
        if looks_like_uuid(&uuid) {
            Ok(uuid)
        } else {
            Err(malformed(&args, format!("not a uuid: {uuid:?}")))
        }
    }

    /// Hot-unplug a VUSB from its running VM.
    pub fn vusb_unplug(&self, vusb: &str) -> Result<(), XeError> {
        self.write(
            &["vusb-unplug".into(), format!("uuid={vusb}")],
            CALL_TIMEOUT,
        )
        .map(drop)
    }

    /// Destroy a VUSB.
    pub fn vusb_destroy(&self, vusb: &str) -> Result<(), XeError> {
        self.write(
            &["vusb-destroy".into(), format!("uuid={vusb}")],
            CALL_TIMEOUT,
        )
        .map(drop)
    }

    /// Start a VM (waits until it runs).
    pub fn vm_start(&self, vm_uuid: &str) -> Result<(), XeError> {
        self.write(
            &["vm-start".into(), format!("uuid={vm_uuid}")],
            START_TIMEOUT,
        )
        .map(drop)
    }

    /// Shut a VM down: clean unless `force` (a hard power-off).
    pub fn vm_shutdown(
        &self,
        vm_uuid: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), XeError> {
        let mut args = vec!["vm-shutdown".to_string(), format!("uuid={vm_uuid}")];
        if force {
            args.push("force=true".into());
        }
        if !self.dry_run {
            self.shutdowns.set(self.shutdowns.get().saturating_add(1));
        }
        self.write(&args, timeout).map(drop)
    }

    // -- plumbing -----------------------------------------------------------

    fn read_records(&self, args: &[String], fields: &[&str]) -> Result<Vec<Record>, XeError> {
        let out = self.read(args)?;
        strict_records(&out, fields).map_err(|reason| malformed(args, reason))
    }

    fn read(&self, args: &[String]) -> Result<String, XeError> {
        self.call(args, CALL_TIMEOUT)
    }

    /// Ok(None) in a dry run.
    fn write(&self, args: &[String], timeout: Duration) -> Result<Option<String>, XeError> {
        if self.dry_run {
            let line = format!("xe {}", display_args(args));
            log::info!("would run: {line}");
            self.planned.borrow_mut().push(line);
            return Ok(None);
        }
        self.call(args, timeout).map(Some)
    }

    /// Run one call; while xapi is down or starting, retry with backoff up
    /// to the wait this client was given.
    fn call(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        if let Some(arg) = args.iter().find(|a| a.contains(['\n', '\r'])) {
            return Err(XeError::BadArgument { arg: arg.clone() });
        }
        let timeout = match self.bound {
            Some(clock) => crate::clock::capped(clock, timeout),
            None => timeout,
        };
        if timeout.is_zero() {
            return Err(XeError::TimedOut {
                args: args.to_vec(),
                after: timeout,
            });
        }
        let Some((clock, limit)) = self.wait else {
            return self.runner.run(args, timeout);
        };
        let deadline = crate::clock::deadline_after(clock, limit);
        let mut pause = XAPI_RETRY_FIRST;
        loop {
            match self.runner.run(args, timeout) {
                Err(err) if err.is_unavailable() && clock.now() < deadline => {
                    if !self.said_waiting.replace(true) {
                        log::warn!(
                            "xapi is not available yet ({err}); waiting up to {} s for it",
                            limit.as_secs()
                        );
                    }
                    clock.sleep(pause.min(crate::clock::time_left(clock, deadline)));
                    pause = (pause * 2).min(XAPI_RETRY_MAX);
                }
                other => return other,
            }
        }
    }
}

/// A read started with [`XeClient`]'s `start_…` methods, collected with
/// [`XeClient::finish`]; dropped uncollected, it is abandoned.
pub struct Started<'a, T> {
    args: Vec<String>,
    call: Result<Box<dyn StartedCall + 'a>, XeError>,
    parse: fn(&[String], &str) -> Result<T, XeError>,
}

/// A VM lookup started with [`XeClient::start_find_vms`].
pub struct StartedVms<'a> {
    spec: String,
    read: Started<'a, Vec<VmInfo>>,
}

fn vm_list_args(filters: &[String]) -> Vec<String> {
    let mut args = vec!["vm-list".to_string()];
    args.extend(filters.iter().cloned());
    args.extend([
        "is-a-template=false".into(),
        "is-a-snapshot=false".into(),
        "is-control-domain=false".into(),
        format!("params={}", VM_FIELDS.join(",")),
    ]);
    args
}

fn parse_vms(args: &[String], out: &str) -> Result<Vec<VmInfo>, XeError> {
    let records = strict_records(out, VM_FIELDS).map_err(|reason| malformed(args, reason))?;
    records
        .iter()
        .map(|r| {
            let power_state = get(r, "power-state")
                .parse()
                .map_err(|reason| malformed(args, reason))?;
            let resident = get(r, "resident-on");
            Ok(VmInfo {
                uuid: get(r, "uuid"),
                power_state,
                resident_on: looks_like_uuid(&resident).then_some(resident),
                ha_restart_priority: get(r, "ha-restart-priority"),
                current_operations: set_items(&get(r, "current-operations")),
                dom_id: get(r, "dom-id").trim().parse::<u32>().ok(),
            })
        })
        .collect()
}

fn pusb_list_args(filters: &[String]) -> Vec<String> {
    let mut args = vec!["pusb-list".to_string()];
    args.extend(filters.iter().cloned());
    args.push(format!("params={}", PUSB_FIELDS.join(",")));
    args
}

fn parse_pusbs(args: &[String], out: &str) -> Result<Vec<PusbInfo>, XeError> {
    let records = strict_records(out, PUSB_FIELDS).map_err(|reason| malformed(args, reason))?;
    Ok(records
        .iter()
        .map(|r| PusbInfo {
            uuid: get(r, "uuid"),
            group: get(r, "usb-group-uuid"),
            host: get(r, "host-uuid"),
            path: get(r, "path"),
            vendor_id: get(r, "vendor-id"),
            product_id: get(r, "product-id"),
            passthrough: get(r, "passthrough-enabled") == "true",
        })
        .collect())
}

fn vusb_list_args(filter: Option<&str>) -> Vec<String> {
    let mut args = vec!["vusb-list".to_string()];
    args.extend(filter.map(str::to_string));
    args.push(format!("params={}", VUSB_FIELDS.join(",")));
    args
}

fn parse_vusbs(args: &[String], out: &str) -> Result<Vec<VusbInfo>, XeError> {
    let records = strict_records(out, VUSB_FIELDS).map_err(|reason| malformed(args, reason))?;
    Ok(records
        .iter()
        .map(|r| VusbInfo {
            uuid: get(r, "uuid"),
            vm_uuid: get(r, "vm-uuid"),
            group: get(r, "usb-group-uuid"),
            attached: get(r, "currently-attached") == "true",
        })
        .collect())
}

fn malformed(args: &[String], reason: String) -> XeError {
    XeError::Malformed {
        args: args.to_vec(),
        reason,
    }
}

fn get(record: &Record, field: &str) -> String {
    record.get(field).cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A clock on which time passes between any two readings (a loaded
    /// machine): each `now` is a second later than the one before.
    struct SlowMachine(Cell<Duration>);

    impl Clock for SlowMachine {
        fn now(&self) -> Duration {
            let now = self.0.get();
            self.0.set(now + Duration::from_secs(1));
            now
        }
        fn sleep(&self, duration: Duration) {
            self.0.set(self.0.get() + duration);
        }
    }

    /// xapi that is always starting.
    struct Starting;

    impl XeRunner for Starting {
        fn run(&self, args: &[String], _timeout: Duration) -> Result<String, XeError> {
            Err(XeError::Unavailable {
                args: args.to_vec(),
                message: "Connection refused".into(),
            })
        }
    }

    #[test]
    fn a_deadline_passing_between_check_and_sleep_is_no_panic() {
        let clock = SlowMachine(Cell::new(Duration::ZERO));
        let xe = XeClient::new(&Starting, "host".into(), false)
            .waiting_for_xapi(&clock, Duration::from_millis(1500));
        assert!(xe.vm("3c6ef362-1f42-4a5d-9b1e-f6a9dbd967af").is_err());
    }
}

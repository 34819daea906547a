//! A simulated XAPI pool that answers `xe` command lines exactly as the fact
//! sheet (`xapi-usb.md`) describes: records, `--minimal`, `params=`, error
//! texts on stderr with exit 1, asynchronous USB scans that replace PUSB,
//! group and VUSBs on re-enumeration, no USB hot plug, VUSB preconditions,
//! several hosts per pool.
//!
//! The world is plain data (serde), so the fake `xe` executable
//! (`coral-xe-sim`) can keep it in a JSON file between calls, and
//! the in-process [`InProcessXe`] runner can drive it on virtual time.
//!
//! Time is passed in by the caller (`now`, a duration since an origin of the
//! caller's choosing); the world never reads a clock itself.

mod commands;
mod runner;
mod state;
mod world;
pub use runner::InProcessXe;
pub use state::SimState;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// VM power states as XAPI names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// How a guest reacts to a clean shutdown request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GuestShutdown {
    /// Acknowledges and halts after `WorldConfig::shutdown_ms`.
    #[default]
    Cooperates,
    /// Never acknowledges: `VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT` after `ack_timeout_ms`.
    NeverAcknowledges,
    /// Acknowledges but never halts: `VM_SHUTDOWN_TIMEOUT` after `shutdown_timeout_ms`.
    NeverHalts,
}

/// A USB device physically present on a host (what a scan discovers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimUsbDevice {
    /// sysfs path, e.g. `2-4`.
    pub path: String,
    /// 4 hex digits, lower case, e.g. `18d1`.
    pub vendor_id: String,
    /// 4 hex digits, lower case.
    pub product_id: String,
    /// e.g. `Google Inc.`
    pub vendor_desc: String,
    /// e.g. `` (empty) or a product string.
    pub product_desc: String,
    /// Serial number string, may be empty.
    pub serial: String,
    /// bcdUSB as XAPI prints it, e.g. `3.10`.
    pub version: String,
    /// e.g. `5000.000` or `480.000`.
    pub speed: String,
    /// Interface classes (for usb-policy.conf filtering; hubs are class 0x09).
    pub interface_classes: Vec<u8>,
}

/// A host of the pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// uuid.
    pub uuid: String,
    /// name-label.
    pub name_label: String,
    /// USB devices plugged into this host right now (the "hardware").
    pub usb_devices: Vec<SimUsbDevice>,
}

/// A VM record (templates, snapshots and control domains included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// uuid.
    pub uuid: String,
    /// name-label (any characters).
    pub name_label: String,
    /// power-state.
    pub power_state: PowerState,
    /// Host uuid when running/paused, else None (`<not in database>`).
    pub resident_on: Option<String>,
    /// is-a-template.
    pub is_a_template: bool,
    /// is-a-snapshot.
    pub is_a_snapshot: bool,
    /// is-control-domain.
    pub is_control_domain: bool,
    /// ha-restart-priority (`""`, `restart`, `best-effort`).
    pub ha_restart_priority: String,
    /// other-config map.
    pub other_config: BTreeMap<String, String>,
    /// How the guest answers a clean shutdown.
    pub guest_shutdown: GuestShutdown,
    /// dom-id: the running domain's id, `-1` without one (halted).
    #[serde(default = "no_domain")]
    pub dom_id: i64,
}

/// The dom-id XAPI shows for a VM without a domain.
fn no_domain() -> i64 {
    -1
}

/// A PUSB record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pusb {
    /// uuid.
    pub uuid: String,
    /// usb-group-uuid.
    pub usb_group_uuid: String,
    /// host-uuid.
    pub host_uuid: String,
    /// The device this record stands for (path, ids, descriptions…).
    pub device: SimUsbDevice,
    /// passthrough-enabled.
    pub passthrough_enabled: bool,
}

/// A USB group record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbGroup {
    /// uuid.
    pub uuid: String,
    /// name-label, `Group of <vid> <pid> USBs`.
    pub name_label: String,
    /// name-description.
    pub name_description: String,
    /// other-config.
    pub other_config: BTreeMap<String, String>,
}

/// A VUSB record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vusb {
    /// uuid.
    pub uuid: String,
    /// vm-uuid.
    pub vm_uuid: String,
    /// usb-group-uuid.
    pub usb_group_uuid: String,
    /// currently-attached (true only while its VM runs, from the VM's start).
    pub currently_attached: bool,
    /// other-config.
    pub other_config: BTreeMap<String, String>,
}

/// One VM power transition, for asserting "VM power history".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerEvent {
    /// When (ms since the caller's origin).
    pub at_ms: u64,
    /// Which VM.
    pub vm_uuid: String,
    /// From state.
    pub from: PowerState,
    /// To state.
    pub to: PowerState,
}

/// One `xe` call as received, for counting calls and asserting "no writes".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    /// When (ms since the caller's origin).
    pub at_ms: u64,
    /// The arguments.
    pub args: Vec<String>,
    /// Its exit status.
    pub status: i32,
    /// How long it took in simulated time (`u64::MAX`: it hung).
    #[serde(default)]
    pub duration_ms: u64,
}

/// An injected fault: make a matching call fail or hang.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The xe command it applies to, e.g. `vm-shutdown`.
    pub command: String,
    /// Apply only to the n-th call of that command (1-based); None = every call.
    pub nth: Option<u32>,
    /// What happens.
    pub kind: FaultKind,
}

impl Fault {
    /// A fault on every call of `command`.
    pub fn every(command: &str, kind: FaultKind) -> Self {
        Fault {
            command: command.into(),
            nth: None,
            kind,
        }
    }

    /// A fault on the `nth` call of `command` only (1-based).
    pub fn nth(command: &str, nth: u32, kind: FaultKind) -> Self {
        Fault {
            command: command.into(),
            nth: Some(nth),
            kind,
        }
    }
}

/// What an injected fault does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Fail with this XAPI error code and parameters, printed as real xe
    /// prints an unknown error (`Error code: …`, `Error parameters: …`),
    /// or with its description for the codes the fact sheet lists.
    Fail {
        /// e.g. `INTERNAL_ERROR`.
        code: String,
        /// Error parameters.
        params: Vec<String>,
    },
    /// Never answer (the call takes forever; nothing changes).
    Hang,
    /// Take effect at once, as usual, but answer only `ms` later: a client
    /// that gives up before then has its call applied anyway (xapi never
    /// watches the client's connection).
    Slow {
        /// Extra time before `xe` answers.
        ms: u64,
    },
}

impl FaultKind {
    /// Fail with XAPI error `code` and these error parameters.
    pub fn fail(code: &str, params: &[&str]) -> Self {
        FaultKind::Fail {
            code: code.into(),
            params: params.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// A period when xapi does not answer calls (boot, toolstack restart).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// From (ms since the origin, inclusive).
    pub from_ms: u64,
    /// Until (exclusive).
    pub until_ms: u64,
    /// What `xe` prints meanwhile.
    pub kind: OutageKind,
}

/// How xapi is unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutageKind {
    /// xapi is not running: `Error: Connection refused (calling connect )`.
    Refused,
    /// xapi is starting: HOST_STILL_BOOTING.
    StillBooting,
}

/// Timings of the simulated pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// Delay between a USB change (udev event) or `pusb-scan` and the scan's result.
    pub scan_delay_ms: u64,
    /// How long a cooperating guest takes to shut down.
    pub shutdown_ms: u64,
    /// How long `vm-start` takes.
    pub start_ms: u64,
    /// VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT comes after this (real: ~60 s).
    pub ack_timeout_ms: u64,
    /// VM_SHUTDOWN_TIMEOUT comes after this (real: 1200 s).
    pub shutdown_timeout_ms: u64,
    /// Cost of every call (real dom0: 100–300 ms).
    pub call_ms: u64,
    /// Time from a scan's start to its reading of the bus (it commits at
    /// `scan_delay_ms` after its start): a bus change in between is not seen.
    #[serde(default)]
    pub scan_read_ms: u64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            scan_delay_ms: 500,
            shutdown_ms: 5_000,
            start_ms: 3_000,
            ack_timeout_ms: 60_000,
            shutdown_timeout_ms: 1_200_000,
            call_ms: 150,
            scan_read_ms: 0,
        }
    }
}

/// A scan of `host_uuid`: it reads the bus at `read_ms` and commits what it
/// read at `due_ms`. Scans of a host run one at a time, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingScan {
    /// Host to scan.
    pub host_uuid: String,
    /// When it completes.
    pub due_ms: u64,
    /// When it reads the bus.
    #[serde(default)]
    pub read_ms: u64,
    /// What it read (None: not read yet, or the bus has not changed since).
    #[serde(default)]
    pub seen: Option<Vec<SimUsbDevice>>,
}

/// A VM power operation running inside xapi, whoever asked for it and
/// whether or not that client is still waiting; it shows in the VM's
/// `current-operations` and ends at `due_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPower {
    /// Which VM.
    pub vm_uuid: String,
    /// The state it reaches.
    pub to: PowerState,
    /// When.
    pub due_ms: u64,
    /// The operation as `current-operations` names it (`start`,
    /// `clean_shutdown`, `hard_shutdown`).
    #[serde(default)]
    pub operation: String,
    /// The operation fails at `due_ms` and the VM keeps its state (a guest
    /// that never acknowledges or never completes a clean shutdown).
    #[serde(default)]
    pub fails: bool,
}

/// What an `xe` process would print and return.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CliOutput {
    /// Exit status (0 success, 1 any error).
    pub status: i32,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

/// The result of one call: its output, and how long it took (a hang is
/// `Duration::MAX`; a caller with a deadline gives up and sees no change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallResult {
    /// What xe printed.
    pub output: CliOutput,
    /// How long the call took in simulated time.
    pub duration: Duration,
}

/// The pool object itself (`xe pool-list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pool {
    /// uuid (a fixed one when empty).
    pub uuid: String,
    /// name-label.
    pub name_label: String,
    /// other-config (`auto_poweron=true` lets xapi-domains start VMs at boot).
    pub other_config: BTreeMap<String, String>,
}

/// The whole simulated pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct World {
    /// The pool record.
    #[serde(default)]
    pub pool: Pool,
    /// Timings.
    pub config: WorldConfig,
    /// Hosts; the first is the pool master.
    pub hosts: Vec<Host>,
    /// VMs.
    pub vms: Vec<Vm>,
    /// PUSBs.
    pub pusbs: Vec<Pusb>,
    /// USB groups.
    pub groups: Vec<UsbGroup>,
    /// VUSBs.
    pub vusbs: Vec<Vusb>,
    /// Scans in flight.
    pub pending_scans: Vec<PendingScan>,
    /// VM power operations in flight (a clean shutdown or a start takes time).
    #[serde(default)]
    pub pending_power: Vec<PendingPower>,
    /// Injected faults.
    pub faults: Vec<Fault>,
    /// Periods when xapi is down or starting.
    #[serde(default)]
    pub outages: Vec<Outage>,
    /// VM power transitions so far.
    pub power_history: Vec<PowerEvent>,
    /// Every call received.
    pub calls: Vec<CallRecord>,
    /// Counter for deterministic uuids.
    pub next_id: u64,
    /// How many more starts of a VM with VUSBs fail in XAPI's USB reset
    /// (xcp-ng/xcp#516, seen after host restarts): each such `vm-start`
    /// fails with [`USB_RESET_FAILURE`] as an INTERNAL_ERROR and the VM
    /// stays halted; a start without VUSBs is not affected.
    #[serde(default)]
    pub usb_reset_failures: u32,
    /// The last domain id handed out (dom0 is 0).
    #[serde(default)]
    pub last_dom_id: i64,
    /// What the failing call being run prints on stdout (NO_HOSTS_AVAILABLE's report).
    #[serde(skip)]
    pub(crate) failure_stdout: String,
    /// How long the failing call being run took.
    #[serde(skip)]
    pub(crate) failure_ms: u64,
}

/// The field report's message of a `vm-start` that failed in XAPI's USB
/// reset (xcp-ng/xcp#516); xe prints it as INTERNAL_ERROR's `message`.
pub const USB_RESET_FAILURE: &str = "Call to usb reset failed: Forkhelpers.Spawn_internal_error";

/// The Coral as the DFU boot loader, as a scan sees it (USB 2, bcdUSB 2.10).
pub fn coral_bootloader_device(path: &str) -> SimUsbDevice {
    SimUsbDevice {
        path: path.to_string(),
        vendor_id: "1a6e".into(),
        product_id: "089a".into(),
        vendor_desc: "Global Unichip Corp.".into(),
        product_desc: String::new(),
        serial: String::new(),
        version: "2.10".into(),
        speed: "480.000".into(),
        interface_classes: vec![0xfe],
    }
}

/// The Coral with its firmware running, as a scan sees it (USB 3, bcdUSB 3.10).
pub fn coral_ready_device(path: &str) -> SimUsbDevice {
    SimUsbDevice {
        path: path.to_string(),
        vendor_id: "18d1".into(),
        product_id: "9302".into(),
        vendor_desc: "Google Inc.".into(),
        product_desc: String::new(),
        serial: String::new(),
        version: "3.10".into(),
        speed: "5000.000".into(),
        interface_classes: vec![0xff],
    }
}

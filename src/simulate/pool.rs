//! The XCP-ng pool of `--simulate`: one host, its VMs and the USB objects
//! XAPI keeps for its Corals, answering exactly the `xe` command lines coral
//! issues with the outputs, preconditions and error texts of the fact sheet
//! (`xapi-usb.md`). USB scans are asynchronous and run one at a time; each
//! reads the bus at its start and commits 500 ms later, replacing the PUSB,
//! group and VUSBs of a device that changed identity. VM starts and clean
//! shutdowns take time. No fault injection, no call records: the test
//! kit's pool (`coral-testkit`) is the adversarial one.

use super::xe_cli::{
    api, cli_error, field, list, map, param_get, set, sim_uuid, Args, Failure, Outcome, Record,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Cost of every call (real dom0: 100–300 ms).
pub const CALL_MS: u64 = 150;
/// From a USB change (udev event) or `pusb-scan` to the scan's result.
pub const SCAN_MS: u64 = 500;
/// How long `vm-start` takes.
const START_MS: u64 = 3_000;
/// How long a guest takes to shut down cleanly.
const SHUTDOWN_MS: u64 = 5_000;
/// Most VUSBs a VM may have.
const MAX_VUSBS_PER_VM: usize = 6;

/// A Coral on the host's bus as a scan sees it: its port path, and whether
/// it runs its firmware (18d1:9302) or is the boot loader (1a6e:089a).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// sysfs path, e.g. `2-4`.
    pub path: String,
    /// Ready (18d1:9302) rather than the boot loader.
    pub ready: bool,
}

impl Device {
    /// vendor-id, product-id, vendor-desc, version (bcdUSB), speed.
    fn ids(&self) -> [&'static str; 5] {
        if self.ready {
            ["18d1", "9302", "Google Inc.", "3.10", "5000.000"]
        } else {
            ["1a6e", "089a", "Global Unichip Corp.", "2.10", "480.000"]
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Vm {
    uuid: String,
    name_label: String,
    running: bool,
    other_config: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Pusb {
    uuid: String,
    group: String,
    device: Device,
    passthrough: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Vusb {
    uuid: String,
    vm: String,
    group: String,
    attached: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Scan {
    read_ms: u64,
    due_ms: u64,
    /// What it read, once the bus changed after its start.
    seen: Option<Vec<Device>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PowerOp {
    vm: String,
    running: bool,
    due_ms: u64,
    operation: String,
}

/// The pool, as saved between `--simulate` runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pool {
    next_id: u64,
    uuid: String,
    other_config: BTreeMap<String, String>,
    host_uuid: String,
    host_name: String,
    vms: Vec<Vm>,
    pusbs: Vec<Pusb>,
    vusbs: Vec<Vusb>,
    /// The host's USB bus as udev last reported it.
    bus: Vec<Device>,
    scans: Vec<Scan>,
    power: Vec<PowerOp>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Pool {
    /// A pool (auto_poweron on) of one host named `host_name`, with running
    /// VMs (auto_poweron on) named `vms`, its USB bus `bus` already scanned.
    pub fn new(host_name: &str, vms: &[&str], bus: Vec<Device>) -> Self {
        let mut pool = Pool::default();
        pool.host_uuid = pool.new_uuid();
        pool.host_name = host_name.to_string();
        pool.uuid = pool.new_uuid();
        let auto: BTreeMap<String, String> = [("auto_poweron".into(), "true".into())].into();
        pool.other_config = auto.clone();
        for name in vms {
            let uuid = pool.new_uuid();
            pool.vms.push(Vm {
                uuid,
                name_label: name.to_string(),
                running: true,
                other_config: auto.clone(),
            });
        }
        pool.commit_scan(&bus);
        pool.bus = bus;
        pool
    }

    /// This host's uuid.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// The USB bus as udev last reported it.
    pub fn bus(&self) -> &Vec<Device> {
        &self.bus
    }

    /// Each VM as `(name, "running" | "halted")`.
    pub fn vm_states(&self) -> Vec<(String, &'static str)> {
        self.vms
            .iter()
            .map(|v| (v.name_label.clone(), power_name(v.running)))
            .collect()
    }

    /// A fresh deterministic uuid.
    fn new_uuid(&mut self) -> String {
        self.next_id += 1;
        sim_uuid(self.next_id)
    }

    /// udev reports the bus as `devices` at `now`: a scan is scheduled;
    /// scans that have already read the bus keep what they read.
    pub fn set_bus(&mut self, devices: Vec<Device>, now: Duration) {
        self.advance(now);
        for scan in self.scans.iter_mut() {
            if scan.read_ms <= ms(now) && scan.seen.is_none() {
                scan.seen = Some(self.bus.clone());
            }
        }
        self.bus = devices;
        self.schedule_scan(ms(now));
    }

    /// A scan asked for at `at_ms`: it starts once the previous one committed.
    fn schedule_scan(&mut self, at_ms: u64) {
        let start = self
            .scans
            .iter()
            .map(|s| s.due_ms)
            .max()
            .unwrap_or(0)
            .max(at_ms);
        self.scans.push(Scan {
            read_ms: start,
            due_ms: start + SCAN_MS,
            seen: None,
        });
    }

    /// A scan's result: PUSBs (and groups) for what it read; the PUSB,
    /// group and VUSBs of what it did not read go.
    fn commit_scan(&mut self, bus: &[Device]) {
        let gone: Vec<String> = (self.pusbs.iter())
            .filter(|p| !bus.contains(&p.device))
            .map(|p| p.group.clone())
            .collect();
        self.pusbs.retain(|p| !gone.contains(&p.group));
        self.vusbs.retain(|v| !gone.contains(&v.group));
        for device in bus {
            if !self.pusbs.iter().any(|p| p.device == *device) {
                let group = self.new_uuid();
                let uuid = self.new_uuid();
                self.pusbs.push(Pusb {
                    uuid,
                    group,
                    device: device.clone(),
                    passthrough: false,
                });
            }
        }
    }

    /// Complete every scan and power operation due by `now`, in time order.
    pub fn advance(&mut self, now: Duration) {
        loop {
            let scan = (self.scans.iter().enumerate()).min_by_key(|(_, s)| s.due_ms);
            let power = (self.power.iter().enumerate()).min_by_key(|(_, p)| p.due_ms);
            match (
                scan.map(|(i, s)| (i, s.due_ms)),
                power.map(|(i, p)| (i, p.due_ms)),
            ) {
                (Some((i, due)), p) if due <= ms(now) && p.is_none_or(|(_, pd)| due <= pd) => {
                    let scan = self.scans.remove(i);
                    let bus = scan.seen.unwrap_or_else(|| self.bus.clone());
                    self.commit_scan(&bus);
                }
                (_, Some((i, due))) if due <= ms(now) => {
                    let op = self.power.remove(i);
                    self.vusbs
                        .iter_mut()
                        .filter(|v| v.vm == op.vm)
                        .for_each(|v| v.attached = op.running);
                    if let Some(vm) = self.vms.iter_mut().find(|v| v.uuid == op.vm) {
                        vm.running = op.running;
                    }
                }
                _ => break,
            }
        }
    }

    /// Run one `xe` command line (without the leading `xe`) at `now`:
    /// stdout or stderr (exit status 1), and how long the call took.
    pub fn execute(
        &mut self,
        sent: &[String],
        now: Duration,
    ) -> (Result<String, String>, Duration) {
        self.advance(now);
        // `xe` joins its arguments with newlines; xapi splits them again.
        let joined = sent.join("\n");
        let args: Vec<String> = joined.split('\n').map(str::to_string).collect();
        let at_ms = ms(now) + CALL_MS;
        match Args::parse(&args[1.min(args.len())..])
            .and_then(|a| self.dispatch(&args[0], &a, at_ms))
        {
            Ok((stdout, extra)) => (Ok(stdout), Duration::from_millis(CALL_MS + extra)),
            Err(Failure(stderr)) => (Err(stderr), Duration::from_millis(CALL_MS)),
        }
    }

    fn dispatch(&mut self, command: &str, a: &Args, at_ms: u64) -> Outcome {
        match command {
            "host-list" => list(a, self.host_records(), &[]),
            "pool-list" => list(a, self.pool_records(), &[]),
            "pusb-list" => list(a, self.pusb_records(), &[]),
            "usb-group-list" => list(a, self.group_records(), &[]),
            "vusb-list" => list(a, self.vusb_records(), &[]),
            "vm-list" => list(a, self.vm_records(), &["uuid", "name-label", "power-state"]),
            "host-param-get" => param_get(a, "host", self.host_records()),
            "pusb-param-get" => param_get(a, "PUSB", self.pusb_records()),
            "usb-group-param-get" => param_get(a, "USB_group", self.group_records()),
            "vusb-param-get" => param_get(a, "VUSB", self.vusb_records()),
            "vm-param-get" => param_get(a, "VM", self.vm_records()),
            "pusb-param-set" => self.pusb_param_set(a),
            "pusb-scan" => {
                let host = a.require("host-uuid")?;
                if host != self.host_uuid {
                    return Err(api("UUID_INVALID", &["host".into(), host.into()]));
                }
                self.schedule_scan(at_ms);
                Ok((String::new(), 0))
            }
            "vusb-create" => self.vusb_create(a),
            "vusb-unplug" | "vusb-destroy" => self.vusb_remove(command, a),
            "vm-start" | "vm-shutdown" => self.vm_power(command, a, at_ms),
            _ => Err(cli_error(&format!(
                "Unknown command: {command}\nFor usage run: 'xe help'"
            ))),
        }
    }

    fn pusb_param_set(&mut self, a: &Args) -> Outcome {
        let uuid = a.require("uuid")?;
        let enabled = match a.require("passthrough-enabled")? {
            "true" => true,
            "false" => false,
            other => {
                return Err(cli_error(&format!(
                    "Error: failed to parse parameter 'passthrough-enabled': expecting 'true' or 'false', got '{other}'"
                )))
            }
        };
        let Some(pusb) = self.pusbs.iter().position(|p| p.uuid == uuid) else {
            return Err(api("UUID_INVALID", &["PUSB".into(), uuid.into()]));
        };
        let group = self.pusbs[pusb].group.clone();
        if !enabled {
            if let Some(v) = self.vusbs.iter().find(|v| v.group == group && v.attached) {
                return Err(api("USB_ALREADY_ATTACHED", &[uuid.into(), v.vm.clone()]));
            }
            self.vusbs.retain(|v| v.group != group);
        }
        self.pusbs[pusb].passthrough = enabled;
        Ok((String::new(), 0))
    }

    fn vusb_create(&mut self, a: &Args) -> Outcome {
        let group = a.require("usb-group-uuid")?.to_string();
        let vm = a.require("vm-uuid")?.to_string();
        if !self.vms.iter().any(|v| v.uuid == vm) {
            return Err(api("UUID_INVALID", &["VM".into(), vm]));
        }
        if !self.pusbs.iter().any(|p| p.group == group) {
            return Err(api("UUID_INVALID", &["USB_group".into(), group]));
        }
        if self.vusbs.iter().filter(|v| v.vm == vm).count() >= MAX_VUSBS_PER_VM {
            return Err(api("TOO_MANY_VUSBS", &[MAX_VUSBS_PER_VM.to_string()]));
        }
        if self.vusbs.iter().any(|v| v.group == group) {
            return Err(api("USB_GROUP_CONFLICT", &[group]));
        }
        let uuid = self.new_uuid();
        let out = format!("{uuid}\n");
        self.vusbs.push(Vusb {
            uuid,
            vm,
            group,
            attached: false,
        });
        Ok((out, 0))
    }

    /// `vusb-unplug` (only while attached to its running VM) and
    /// `vusb-destroy` (only when not attached).
    fn vusb_remove(&mut self, command: &str, a: &Args) -> Outcome {
        let uuid = a.require("uuid")?;
        let Some(i) = self.vusbs.iter().position(|v| v.uuid == uuid) else {
            return Err(api("UUID_INVALID", &["VUSB".into(), uuid.into()]));
        };
        let attached = self.vusbs[i].attached;
        let vm_running = self
            .vms
            .iter()
            .any(|v| v.uuid == self.vusbs[i].vm && v.running);
        match command {
            "vusb-unplug" if vm_running && attached => self.vusbs[i].attached = false,
            "vusb-unplug" => {
                let reason = "VUSB is not currently attached";
                return Err(api("OPERATION_NOT_ALLOWED", &[reason.into()]));
            }
            _ if attached => {
                let reason = "VUSB is currently attached; unplug it first";
                return Err(api("OPERATION_NOT_ALLOWED", &[reason.into()]));
            }
            _ => {
                self.vusbs.remove(i);
            }
        }
        Ok((String::new(), 0))
    }

    /// `vm-start uuid=…` (returns once the VM runs) and `vm-shutdown
    /// uuid=… [force=true]` (clean: once the guest halted; a hard shutdown
    /// is allowed during a clean one and voids it).
    fn vm_power(&mut self, command: &str, a: &Args, at_ms: u64) -> Outcome {
        let uuid = a.get("uuid").unwrap_or_default();
        let Some(vm) = self.vms.iter().find(|v| v.uuid == uuid).cloned() else {
            return Err(cli_error("Error: No matching VMs found"));
        };
        let start = command == "vm-start";
        let force = a.get("force") == Some("true");
        let ops: Vec<&str> = self.current_operations(uuid);
        if force && !ops.is_empty() && ops.iter().all(|o| *o == "clean_shutdown") {
            self.power.retain(|p| p.vm != uuid);
        } else if !ops.is_empty() {
            return Err(api(
                "OTHER_OPERATION_IN_PROGRESS",
                &["VM".into(), uuid.into()],
            ));
        }
        if vm.running == start {
            let expected = power_name(!start);
            let params = [
                format!("{uuid} ({})", vm.name_label),
                expected.into(),
                power_name(vm.running).into(),
            ];
            return Err(api("VM_BAD_POWER_STATE", &params));
        }
        let (took, operation) = match (start, force) {
            (true, _) => (START_MS, "start"),
            (false, true) => (0, "hard_shutdown"),
            (false, false) => (SHUTDOWN_MS, "clean_shutdown"),
        };
        self.power.push(PowerOp {
            vm: vm.uuid,
            running: start,
            due_ms: at_ms + took,
            operation: operation.into(),
        });
        Ok((String::new(), took))
    }

    fn current_operations(&self, vm: &str) -> Vec<&str> {
        (self.power.iter())
            .filter(|p| p.vm == vm)
            .map(|p| p.operation.as_str())
            .collect()
    }

    // -- records, fields in xe's order ---------------------------------------

    fn host_records(&self) -> Vec<Record> {
        vec![vec![
            field("uuid", "RO", &self.host_uuid),
            field("name-label", "RW", &self.host_name),
            field("name-description", "RW", ""),
        ]]
    }

    fn pool_records(&self) -> Vec<Record> {
        vec![vec![
            field("uuid", "RO", &self.uuid),
            field("name-label", "RW", ""),
            field("name-description", "RW", ""),
            field("master", "RO", &self.host_uuid),
            field("default-SR", "RW", "<not in database>"),
            field("other-config", "MRW", map(&self.other_config)),
        ]]
    }

    fn pusb_records(&self) -> Vec<Record> {
        (self.pusbs.iter())
            .map(|p| {
                let [vendor_id, product_id, vendor_desc, version, speed] = p.device.ids();
                vec![
                    field("uuid", "RO", &p.uuid),
                    field("usb-group-uuid", "RO", &p.group),
                    field("host-uuid", "RO", &self.host_uuid),
                    field("host-name-label", "RO", &self.host_name),
                    field("path", "RO", &p.device.path),
                    field("vendor-id", "RO", vendor_id),
                    field("vendor-desc", "RO", vendor_desc),
                    field("product-id", "RO", product_id),
                    field("product-desc", "RO", ""),
                    field("serial", "RO", ""),
                    field("version", "RO", version),
                    field("description", "RO", vendor_desc),
                    field("speed", "RO", speed),
                    field("passthrough-enabled", "RW", p.passthrough.to_string()),
                ]
            })
            .collect()
    }

    fn group_name(&self, group: &str) -> String {
        (self.pusbs.iter().find(|p| p.group == group))
            .map(|p| {
                let [vendor_id, product_id, ..] = p.device.ids();
                format!("Group of {vendor_id} {product_id} USBs")
            })
            .unwrap_or_default()
    }

    fn group_records(&self) -> Vec<Record> {
        (self.pusbs.iter())
            .map(|p| {
                let vusbs: Vec<String> = (self.vusbs.iter())
                    .filter(|v| v.group == p.group)
                    .map(|v| v.uuid.clone())
                    .collect();
                vec![
                    field("uuid", "RO", &p.group),
                    field("name-label", "RW", self.group_name(&p.group)),
                    field("name-description", "RW", ""),
                    field("VUSB-uuids", "SRO", set(&vusbs)),
                    field("PUSB-uuids", "SRO", &p.uuid),
                    field("other-config", "MRW", ""),
                ]
            })
            .collect()
    }

    fn vusb_records(&self) -> Vec<Record> {
        (self.vusbs.iter())
            .map(|v| {
                let vm_name = (self.vms.iter().find(|vm| vm.uuid == v.vm))
                    .map(|vm| vm.name_label.clone())
                    .unwrap_or_default();
                let allowed = if v.attached { "unplug" } else { "destroy" };
                vec![
                    field("uuid", "RO", &v.uuid),
                    field("vm-uuid", "RO", &v.vm),
                    field("vm-name-label", "RO", vm_name),
                    field("usb-group-uuid", "RO", &v.group),
                    field("usb-group-name-label", "RO", self.group_name(&v.group)),
                    field("other-config", "MRW", ""),
                    field("currently-attached", "RO", v.attached.to_string()),
                    field("allowed-operations", "SRO", allowed),
                    field("current-operations", "SRO", ""),
                ]
            })
            .collect()
    }

    fn vm_records(&self) -> Vec<Record> {
        (self.vms.iter())
            .map(|v| {
                let operations: Vec<String> = (self.current_operations(&v.uuid).iter())
                    .map(|o| o.to_string())
                    .collect();
                let resident = if v.running {
                    self.host_uuid.as_str()
                } else {
                    "<not in database>"
                };
                vec![
                    field("uuid", "RO", &v.uuid),
                    field("name-label", "RW", &v.name_label),
                    field("name-description", "RW", ""),
                    field("is-a-template", "RW", "false"),
                    field("is-a-snapshot", "RO", "false"),
                    field("is-control-domain", "RO", "false"),
                    field("power-state", "RO", power_name(v.running)),
                    field("other-config", "MRW", map(&v.other_config)),
                    field("current-operations", "SRO", set(&operations)),
                    field("resident-on", "RO", resident),
                    field("ha-restart-priority", "RW", ""),
                    field("dom-id", "RO", if v.running { "1" } else { "-1" }),
                ]
            })
            .collect()
    }
}

/// XAPI's name of a VM's power state.
fn power_name(running: bool) -> &'static str {
    if running {
        "running"
    } else {
        "halted"
    }
}

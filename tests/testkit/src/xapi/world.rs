//! The pool's own behaviour: hosts and VMs, USB scans (identity, new and
//! vanished devices), and VM power operations that take time.

use super::{
    Host, Outage, OutageKind, PendingPower, PendingScan, PowerEvent, PowerState, Pusb,
    SimUsbDevice, UsbGroup, Vm, World, WorldConfig,
};
use coral::simulate::xe_cli::sim_uuid;
use std::collections::BTreeMap;
use std::time::Duration;

/// Interface classes `/etc/xensource/usb-policy.conf` denies by default
/// (communications, CDC data, smart card, wireless); hubs (0x09) never pass.
const DENIED_CLASSES: &[u8] = &[0x02, 0x0a, 0x0b, 0xe0];
const HUB_CLASS: u8 = 0x09;

/// Milliseconds of a duration, saturating.
pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl World {
    /// An empty pool with these timings.
    pub fn new(config: WorldConfig) -> Self {
        World {
            config,
            ..World::default()
        }
    }

    /// A fresh deterministic uuid.
    pub fn new_uuid(&mut self) -> String {
        self.next_id += 1;
        sim_uuid(self.next_id)
    }

    /// Add a host; returns its uuid.
    pub fn add_host(&mut self, name_label: &str) -> String {
        let uuid = self.new_uuid();
        self.hosts.push(Host {
            uuid: uuid.clone(),
            name_label: name_label.to_string(),
            usb_devices: Vec::new(),
        });
        uuid
    }

    /// Add a VM (not a template); `resident_on` must be given for a running or
    /// paused VM. Returns its uuid.
    pub fn add_vm(
        &mut self,
        name_label: &str,
        power_state: PowerState,
        resident_on: Option<&str>,
    ) -> String {
        let uuid = self.new_uuid();
        let dom_id = match power_state {
            PowerState::Running | PowerState::Paused => self.new_dom_id(),
            _ => -1,
        };
        self.vms.push(Vm {
            uuid: uuid.clone(),
            name_label: name_label.to_string(),
            power_state,
            resident_on: resident_on.map(str::to_string),
            is_a_template: false,
            is_a_snapshot: false,
            is_control_domain: false,
            ha_restart_priority: String::new(),
            other_config: BTreeMap::new(),
            guest_shutdown: Default::default(),
            dom_id,
        });
        uuid
    }

    /// A fresh domain id (a VM start creates a new domain).
    pub fn new_dom_id(&mut self) -> i64 {
        self.last_dom_id += 1;
        self.last_dom_id
    }

    /// xapi does not answer as `kind` says from `from_ms` until `until_ms`.
    pub fn add_outage(&mut self, from_ms: u64, until_ms: u64, kind: OutageKind) {
        self.outages.push(Outage {
            from_ms,
            until_ms,
            kind,
        });
    }

    /// The VM with this uuid.
    pub fn vm(&self, uuid: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.uuid == uuid)
    }

    /// The VM with this uuid, mutable.
    pub fn vm_mut(&mut self, uuid: &str) -> Option<&mut Vm> {
        self.vms.iter_mut().find(|v| v.uuid == uuid)
    }

    /// The host with this uuid.
    pub fn host(&self, uuid: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.uuid == uuid)
    }

    /// Replace the USB devices physically present on a host, as udev would
    /// report them; schedules the asynchronous scan that udev triggers.
    pub fn set_usb_devices(&mut self, host_uuid: &str, devices: Vec<SimUsbDevice>, now: Duration) {
        // Scans due before the change saw the old hardware; scans that have
        // already read the bus keep what they read.
        self.advance(now);
        let now_ms = ms(now);
        let before = self.host(host_uuid).map(|h| h.usb_devices.clone());
        for scan in self
            .pending_scans
            .iter_mut()
            .filter(|s| s.host_uuid == host_uuid && s.read_ms <= now_ms && s.seen.is_none())
        {
            scan.seen = before.clone();
        }
        if let Some(host) = self.hosts.iter_mut().find(|h| h.uuid == host_uuid) {
            host.usb_devices = devices;
        }
        self.schedule_scan(host_uuid, now);
    }

    /// A scan of `host_uuid` asked for at `now`: it starts when the host's
    /// previous scan has committed (scans run one at a time, in order),
    /// reads the bus `scan_read_ms` after its start and commits
    /// `scan_delay_ms` after its start.
    pub fn schedule_scan(&mut self, host_uuid: &str, now: Duration) {
        let start = self
            .pending_scans
            .iter()
            .filter(|s| s.host_uuid == host_uuid)
            .map(|s| s.due_ms)
            .max()
            .unwrap_or(0)
            .max(ms(now));
        self.pending_scans.push(PendingScan {
            host_uuid: host_uuid.to_string(),
            due_ms: start + self.config.scan_delay_ms,
            read_ms: start + self.config.scan_read_ms.min(self.config.scan_delay_ms),
            seen: None,
        });
    }

    /// Queue a scan that has already read `seen` and commits at `due_ms`
    /// (test set-up: xapi's start-up scan read the bus while the Coral was a
    /// boot loader, and has not committed yet).
    pub fn queue_scan_that_saw(&mut self, host_uuid: &str, seen: Vec<SimUsbDevice>, due_ms: u64) {
        self.pending_scans.push(PendingScan {
            host_uuid: host_uuid.to_string(),
            due_ms,
            read_ms: 0,
            seen: Some(seen),
        });
    }

    /// Run a scan of `host_uuid` synchronously (test set-up: "xapi has started").
    pub fn scan_now(&mut self, host_uuid: &str) {
        let Some(host) = self.host(host_uuid).cloned() else {
            return;
        };
        self.commit_scan(host_uuid, &host.usb_devices);
    }

    /// A scan's result: PUSBs for what it read, gone for what it did not.
    fn commit_scan(&mut self, host_uuid: &str, bus: &[SimUsbDevice]) {
        let present: Vec<&SimUsbDevice> = bus.iter().filter(|d| passes_usb_policy(d)).collect();
        // Vanished: PUSB, its group and every VUSB on the group go.
        let gone: Vec<Pusb> = self
            .pusbs
            .iter()
            .filter(|p| {
                p.host_uuid == host_uuid && !present.iter().any(|d| same_identity(d, &p.device))
            })
            .cloned()
            .collect();
        for pusb in gone {
            self.pusbs.retain(|p| p.uuid != pusb.uuid);
            self.groups.retain(|g| g.uuid != pusb.usb_group_uuid);
            self.vusbs
                .retain(|v| v.usb_group_uuid != pusb.usb_group_uuid);
        }
        // New: a PUSB (passthrough off) and its group.
        for device in present {
            let known = self
                .pusbs
                .iter()
                .any(|p| p.host_uuid == host_uuid && same_identity(device, &p.device));
            if known {
                continue;
            }
            let group_uuid = self.new_uuid();
            self.groups.push(UsbGroup {
                uuid: group_uuid.clone(),
                name_label: format!("Group of {} {} USBs", device.vendor_id, device.product_id),
                name_description: String::new(),
                other_config: BTreeMap::new(),
            });
            let uuid = self.new_uuid();
            self.pusbs.push(Pusb {
                uuid,
                usb_group_uuid: group_uuid,
                host_uuid: host_uuid.to_string(),
                device: device.clone(),
                passthrough_enabled: false,
            });
        }
    }

    /// Complete every scan and power operation due at or before `now`, in time order.
    pub fn advance(&mut self, now: Duration) {
        let now_ms = ms(now);
        loop {
            let scan = self
                .pending_scans
                .iter()
                .enumerate()
                .filter(|(_, s)| s.due_ms <= now_ms)
                .min_by_key(|(_, s)| s.due_ms)
                .map(|(i, s)| (i, s.due_ms));
            let power = self
                .pending_power
                .iter()
                .enumerate()
                .filter(|(_, p)| p.due_ms <= now_ms)
                .min_by_key(|(_, p)| p.due_ms)
                .map(|(i, p)| (i, p.due_ms));
            match (scan, power) {
                (Some((i, due)), Some((_, pdue))) if due <= pdue => self.complete_scan(i),
                (Some((i, _)), None) => self.complete_scan(i),
                (_, Some((i, _))) => {
                    let op = self.pending_power.remove(i);
                    self.complete_power(&op);
                }
                (None, None) => break,
            }
        }
    }

    fn complete_scan(&mut self, index: usize) {
        let scan = self.pending_scans.remove(index);
        let bus = match scan.seen {
            Some(seen) => seen,
            None => self
                .host(&scan.host_uuid)
                .map(|h| h.usb_devices.clone())
                .unwrap_or_default(),
        };
        self.commit_scan(&scan.host_uuid, &bus);
    }

    /// The operations in flight on a VM, as `current-operations` names them.
    pub fn current_operations(&self, vm_uuid: &str) -> Vec<String> {
        self.pending_power
            .iter()
            .filter(|p| p.vm_uuid == vm_uuid)
            .map(|p| p.operation.clone())
            .collect()
    }

    /// Change a VM's power state now, with its consequences for VUSBs.
    pub(super) fn complete_power(&mut self, op: &PendingPower) {
        let Some(vm) = self.vm(&op.vm_uuid).cloned() else {
            return;
        };
        if op.fails || vm.power_state == op.to {
            return;
        }
        let resident = match op.to {
            PowerState::Running | PowerState::Paused => Some(self.start_host(&vm.uuid)),
            _ => None,
        };
        let attached = op.to == PowerState::Running;
        for vusb in self.vusbs.iter_mut().filter(|v| v.vm_uuid == vm.uuid) {
            vusb.currently_attached = attached;
        }
        if let Some(vm_mut) = self.vm_mut(&op.vm_uuid) {
            vm_mut.power_state = op.to;
            vm_mut.resident_on = resident;
            if op.to == PowerState::Halted {
                vm_mut.dom_id = -1;
            }
        }
        self.power_history.push(PowerEvent {
            at_ms: op.due_ms,
            vm_uuid: vm.uuid,
            from: vm.power_state,
            to: op.to,
        });
    }

    /// The hosts that hold the PUSB of each VUSB of a VM (None for a VUSB
    /// whose group has no PUSB any more).
    pub(super) fn vusb_hosts(&self, vm_uuid: &str) -> Vec<Option<String>> {
        self.vusbs
            .iter()
            .filter(|v| v.vm_uuid == vm_uuid)
            .map(|v| {
                self.pusbs
                    .iter()
                    .find(|p| p.usb_group_uuid == v.usb_group_uuid)
                    .map(|p| p.host_uuid.clone())
            })
            .collect()
    }

    /// Where a VM starts: the host holding the PUSB of one of its VUSBs, else the master.
    fn start_host(&self, vm_uuid: &str) -> String {
        self.vusbs
            .iter()
            .filter(|v| v.vm_uuid == vm_uuid)
            .find_map(|v| {
                self.pusbs
                    .iter()
                    .find(|p| p.usb_group_uuid == v.usb_group_uuid)
            })
            .map(|p| p.host_uuid.clone())
            .or_else(|| self.hosts.first().map(|h| h.uuid.clone()))
            .unwrap_or_default()
    }
}

/// XAPI's identity of a USB device: path, vendor, product, serial.
fn same_identity(a: &SimUsbDevice, b: &SimUsbDevice) -> bool {
    a.path == b.path
        && a.vendor_id == b.vendor_id
        && a.product_id == b.product_id
        && a.serial == b.serial
}

/// The default usb-policy.conf: hubs never; a device whose every interface
/// class is denied does not become a PUSB.
fn passes_usb_policy(device: &SimUsbDevice) -> bool {
    if device.interface_classes.contains(&HUB_CLASS) {
        return false;
    }
    device.interface_classes.is_empty()
        || device
            .interface_classes
            .iter()
            .any(|c| !DENIED_CLASSES.contains(c))
}

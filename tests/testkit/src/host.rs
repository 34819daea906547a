//! A simulated host for in-process tests: the adversarial Coral bus
//! ([`crate::device`]) and XAPI pool ([`crate::xapi`]) wired together as udev
//! wires them (every bus change reaches XAPI as an asynchronous scan), on a
//! virtual clock. [`SimulatedHost::new`] is the same scene as the product's
//! `--simulate` host (one Coral on xHCI port 4, a running VM `frigate`);
//! [`SimulatedHost::from_parts`] builds any other.

use crate::device::{SimBus, SimCoralConfig};
use crate::xapi::{
    coral_bootloader_device, coral_ready_device, InProcessXe, PowerState, SimUsbDevice, World,
    WorldConfig,
};
use coral::clock::{Clock, VirtualClock};
use coral::firmware::{FirmwareImage, FirmwareSource};
use coral::usb::{CoralDevice, CoralState, NodeCheck, UsbBus, UsbError, UsbTransport};
use coral::xe::{StartedCall, XeError, XeRunner};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

/// The simulated Coral + XCP-ng host.
pub struct SimulatedHost {
    clock: Rc<VirtualClock>,
    bus: Rc<SimBus>,
    udev: Udev,
    xe: BusSyncedXe,
    host_uuid: String,
}

impl SimulatedHost {
    /// A host with `frigate` running and its Coral in `coral`: uninitialized
    /// (right after a power loss, boot loader at `1-4`) or ready (at `2-4`,
    /// its PUSB listed, no VUSB yet).
    pub fn new(coral: CoralState) -> Self {
        let clock = Rc::new(VirtualClock::new());
        let bus = Rc::new(SimBus::new(clock.clone()));
        bus.add_coral(SimCoralConfig::xhci(4), coral);

        let mut world = World::new(WorldConfig::default());
        let host_uuid = world.add_host("xcp-ng-sim");
        world.pool.uuid = world.new_uuid();
        world
            .pool
            .other_config
            .insert("auto_poweron".into(), "true".into());
        let vm = world.add_vm("frigate", PowerState::Running, Some(&host_uuid));
        if let Some(vm) = world.vms.iter_mut().find(|v| v.uuid == vm) {
            vm.other_config.insert("auto_poweron".into(), "true".into());
        }
        Self::from_parts(clock, bus, world, host_uuid)
    }

    /// A host from its parts (tests build their own scenarios): the world
    /// is told what is on the bus now and has scanned it (xapi has started).
    pub fn from_parts(
        clock: Rc<VirtualClock>,
        bus: Rc<SimBus>,
        mut world: World,
        host_uuid: String,
    ) -> Self {
        let mut devices: Vec<SimUsbDevice> = world
            .host(&host_uuid)
            .map(|h| h.usb_devices.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|d| !is_coral(d))
            .collect();
        devices.extend(as_xapi_devices(&bus.snapshot()));
        world.set_usb_devices(&host_uuid, devices, clock.now());
        world.scan_now(&host_uuid);
        let world = Rc::new(RefCell::new(world));
        let udev = Udev(Rc::new(UdevState {
            world: world.clone(),
            bus: bus.clone(),
            clock: clock.clone(),
            host_uuid: host_uuid.clone(),
            last_seen: RefCell::new(Some(bus.snapshot())),
            qemu_marks: RefCell::new(BTreeMap::new()),
        }));
        let xe = BusSyncedXe {
            inner: InProcessXe::new(world, clock.clone()),
            udev: udev.clone(),
        };
        SimulatedHost {
            clock,
            bus,
            udev,
            xe,
            host_uuid,
        }
    }

    /// The simulated XAPI world (to inspect records and power history),
    /// with everything due by now (scans, power operations) completed.
    pub fn world(&self) -> Rc<RefCell<World>> {
        let world = self.xe.inner.world.clone();
        world.borrow_mut().advance(self.clock.now());
        world
    }

    /// The simulated bus itself (fault knobs, recorded requests).
    pub fn sim_bus(&self) -> &SimBus {
        &self.bus
    }

    /// The virtual clock everything runs on.
    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// The simulated USB bus, as the product sees it: every change it
    /// shows reaches XAPI as a udev event would (device removed, device
    /// added), each starting an asynchronous scan.
    pub fn bus(&self) -> &dyn UsbBus {
        &self.udev
    }

    /// The simulated `xe`.
    pub fn xe(&self) -> &dyn XeRunner {
        &self.xe
    }

    /// The simulated host's uuid (its "inventory").
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// Tell XAPI about the bus as it is now, as udev does at the moment a
    /// device arrives or leaves (its scan then runs asynchronously).
    pub fn udev_event(&self) {
        self.xe.udev.sync();
    }
}

/// udev on the simulated host: whenever the bus differs from what XAPI was
/// last told (seen at a USB listing or before an `xe` call), XAPI is told,
/// which schedules its asynchronous scan. A re-enumeration seen as "gone"
/// then "back" is two events and two scans, as on a real host.
#[derive(Clone)]
struct Udev(Rc<UdevState>);

struct UdevState {
    world: Rc<RefCell<World>>,
    bus: Rc<SimBus>,
    clock: Rc<VirtualClock>,
    host_uuid: String,
    last_seen: RefCell<Option<Vec<CoralDevice>>>,
    /// What `usb_reset.py attach` marked at each VM start: per domain, the
    /// (port, device number) of each node handed to its QEMU.
    qemu_marks: RefCell<BTreeMap<i64, Vec<(String, u8)>>>,
}

impl Udev {
    fn sync(&self) {
        let s = &self.0;
        let now_present = s.bus.snapshot();
        let changed = s.last_seen.borrow().as_ref() != Some(&now_present);
        if changed {
            // Devices other than Corals (a test's keyboard, disk…) stay as they are.
            let mut devices: Vec<SimUsbDevice> = s
                .world
                .borrow()
                .host(&s.host_uuid)
                .map(|h| h.usb_devices.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|d| !is_coral(d))
                .collect();
            devices.extend(as_xapi_devices(&now_present));
            s.world
                .borrow_mut()
                .set_usb_devices(&s.host_uuid, devices, s.clock.now());
            *s.last_seen.borrow_mut() = Some(now_present);
        }
    }
}

impl Udev {
    /// A VM started: as xapi's `usb_reset.py attach` does for each of its
    /// VUSBs, mark the node of the device at the PUSB's path for its new
    /// domain (xapi-usb.md, "A drop that XAPI does not see").
    fn mark_started(&self, vm_uuid: &str) {
        let s = &self.0;
        let world = s.world.borrow();
        let Some(vm) = world.vm(vm_uuid) else {
            return;
        };
        if vm.dom_id < 0 {
            return;
        }
        let bus = s.bus.snapshot();
        let mut nodes = Vec::new();
        for vusb in world.vusbs.iter().filter(|v| v.vm_uuid == vm_uuid) {
            let pusb = world
                .pusbs
                .iter()
                .find(|p| p.usb_group_uuid == vusb.usb_group_uuid && p.host_uuid == s.host_uuid);
            if let Some(pusb) = pusb {
                if let Some(dev) = bus.iter().find(|c| c.path.to_string() == pusb.device.path) {
                    nodes.push((pusb.device.path.clone(), dev.address));
                }
            }
        }
        s.qemu_marks.borrow_mut().insert(vm.dom_id, nodes);
    }
}

impl UsbBus for Udev {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        self.sync();
        self.0.bus.list_corals()
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        self.0.bus.open(device)
    }

    fn qemu_node(&self, path: &str, domid: u32) -> NodeCheck {
        let marks = self.0.qemu_marks.borrow();
        let Some(nodes) = marks.get(&i64::from(domid)).filter(|n| !n.is_empty()) else {
            return NodeCheck::Unknown(format!("no mark of domain {domid}"));
        };
        let Some(now) = self
            .0
            .bus
            .snapshot()
            .into_iter()
            .find(|c| c.path.to_string() == path)
        else {
            return NodeCheck::Unknown(format!("no USB device at {path}"));
        };
        if nodes
            .iter()
            .any(|(p, dev)| p == path && *dev == now.address)
        {
            NodeCheck::Given
        } else {
            let bus = path
                .split('-')
                .next()
                .and_then(|b| b.parse::<u32>().ok())
                .unwrap_or(0);
            NodeCheck::Lost {
                node: format!("/dev/bus/usb/{bus:03}/{:03}", now.address),
            }
        }
    }
}

/// An `xe` whose XAPI sees the simulated USB bus.
struct BusSyncedXe {
    inner: InProcessXe,
    udev: Udev,
}

impl XeRunner for BusSyncedXe {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        self.udev.sync();
        let result = self.inner.run(args, timeout);
        if result.is_ok() && args.first().map(String::as_str) == Some("vm-start") {
            let now = self.inner.clock_now();
            self.inner.world.borrow_mut().advance(now);
            for vm in args.iter().filter_map(|a| a.strip_prefix("uuid=")) {
                self.udev.mark_started(vm);
            }
        }
        result
    }

    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        self.udev.sync();
        self.inner.start(args, timeout)
    }
}

/// A Coral in either identity.
fn is_coral(device: &SimUsbDevice) -> bool {
    matches!(
        (device.vendor_id.as_str(), device.product_id.as_str()),
        ("1a6e", "089a") | ("18d1", "9302")
    )
}

/// The devices as XAPI's scan would see them.
fn as_xapi_devices(corals: &[CoralDevice]) -> Vec<SimUsbDevice> {
    corals
        .iter()
        .map(|c| match c.state {
            CoralState::Uninitialized => coral_bootloader_device(&c.path.to_string()),
            CoralState::Ready => coral_ready_device(&c.path.to_string()),
        })
        .collect()
}

/// A stand-in for `apex_latest_single_ep.bin` in in-process tests: an image
/// of the real one's size (10,783 bytes, 43 blocks of 256) and known name,
/// with made-up bytes.
pub fn stand_in_single_ep_image() -> FirmwareImage {
    let bytes: Vec<u8> = (0..10_783u32).map(|i| (i * 7 % 251) as u8).collect();
    FirmwareImage {
        sha256: "test".into(),
        bytes,
        source: FirmwareSource::Flag("test.bin".into()),
        known_name: Some("apex_latest_single_ep.bin".into()),
    }
}

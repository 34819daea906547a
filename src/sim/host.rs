//! The built-in simulated host behind `--simulate`: one Coral on xHCI port 4
//! (boot loader at `1-4`, ready at `2-4` 800 ms after its reset) and an
//! XCP-ng pool of one host with a running VM `frigate` (auto_poweron) whose
//! XAPI scan sees the simulated USB bus, all on a virtual clock so a run is
//! instant yet reports realistic times.

use super::coral::{SimBus, SimCoralConfig};
use super::xapi::{
    coral_bootloader_device, coral_ready_device, InProcessXe, PowerState, SimUsbDevice, World,
    WorldConfig,
};
use crate::clock::{Clock, VirtualClock};
use crate::firmware::{FirmwareImage, FirmwareSource};
use crate::usb::{CoralDevice, CoralState, UsbBus, UsbError, UsbTransport};
use crate::xe::{XeError, XeRunner};
use std::cell::RefCell;
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
        world.set_usb_devices(&host_uuid, as_xapi_devices(&bus.snapshot()), clock.now());
        world.scan_now(&host_uuid);
        let world = Rc::new(RefCell::new(world));
        let udev = Udev(Rc::new(UdevState {
            world: world.clone(),
            bus: bus.clone(),
            clock: clock.clone(),
            host_uuid: host_uuid.clone(),
            last_seen: RefCell::new(Some(bus.snapshot())),
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

    /// One line saying what is simulated, for the log.
    pub fn describe(&self) -> String {
        let corals = self
            .bus
            .snapshot()
            .iter()
            .map(|c| format!("{} Coral at {}", c.state, c.path))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "simulated host (virtual time): {corals}; VM 'frigate' running; xe calls 150 ms, XAPI USB scan 500 ms, re-enumeration 800 ms"
        )
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
}

impl Udev {
    fn sync(&self) {
        let s = &self.0;
        let now_present = s.bus.snapshot();
        let changed = s.last_seen.borrow().as_ref() != Some(&now_present);
        if changed {
            s.world.borrow_mut().set_usb_devices(
                &s.host_uuid,
                as_xapi_devices(&now_present),
                s.clock.now(),
            );
            *s.last_seen.borrow_mut() = Some(now_present);
        }
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
}

/// An `xe` whose XAPI sees the simulated USB bus.
struct BusSyncedXe {
    inner: InProcessXe,
    udev: Udev,
}

impl XeRunner for BusSyncedXe {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        self.udev.sync();
        self.inner.run(args, timeout)
    }
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

/// What `--simulate` uploads when no firmware is configured: a stand-in of
/// the real image's size (the simulated Coral accepts any image), so a
/// newcomer sees the whole procedure before getting the real one.
pub fn stand_in_firmware() -> FirmwareImage {
    let bytes: Vec<u8> = (0..10_783u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    FirmwareImage {
        sha256: crate::firmware::sha256_hex(&bytes),
        bytes,
        source: FirmwareSource::Simulated,
        known_name: None,
    }
}

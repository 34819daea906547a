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
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// Env var naming the file that keeps the `--simulate` world between runs.
pub const SIM_STATE_ENV: &str = "CORAL_SIM_STATE";

/// The simulated host as saved between `--simulate` runs, so that `up`,
/// then `status`, then `detach` tell one story.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimSnapshot {
    /// Virtual time reached (ms).
    pub now_ms: u64,
    /// Each Coral's identity (`uninitialized` or `ready`), xHCI ports 4, 5, …
    pub corals: Vec<String>,
    /// This host's uuid.
    pub host_uuid: String,
    /// The pool.
    pub world: World,
}

/// Where `--simulate` keeps its state: `$CORAL_SIM_STATE`, else
/// `$XDG_RUNTIME_DIR/coral-sim.json`, else `/tmp/coral-sim-<uid>.json`.
pub fn sim_state_path() -> PathBuf {
    if let Some(path) = std::env::var_os(SIM_STATE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("coral-sim.json"),
        None => {
            use std::os::unix::fs::MetadataExt;
            let uid = std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(0);
            PathBuf::from(format!("/tmp/coral-sim-{uid}.json"))
        }
    }
}

/// The simulated host's own file system root (its /etc), next to its state
/// file: `coral-sim.json` → `coral-sim.root/`.
pub fn sim_root(state: &Path) -> PathBuf {
    state.with_extension("root")
}

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

    /// The host saved in `path`, or a new one (see [`SimulatedHost::new`])
    /// when there is none yet.
    pub fn load_or_new(path: &Path, coral: CoralState) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let snapshot: SimSnapshot = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "bad simulation state {}; delete it to start over",
                        path.display()
                    )
                })?;
                Ok(Self::restore(snapshot))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::new(coral)),
            Err(e) => Err(anyhow::anyhow!(
                "cannot read the simulation state {}: {e}",
                path.display()
            )),
        }
    }

    /// A host as it was saved.
    pub fn restore(snapshot: SimSnapshot) -> Self {
        let clock = Rc::new(VirtualClock::new());
        clock.advance(Duration::from_millis(snapshot.now_ms));
        let bus = Rc::new(SimBus::new(clock.clone()));
        for (i, state) in snapshot.corals.iter().enumerate() {
            let state = if state == "ready" {
                CoralState::Ready
            } else {
                CoralState::Uninitialized
            };
            bus.add_coral(SimCoralConfig::xhci(4 + i as u8), state);
        }
        Self::from_parts(clock, bus, snapshot.world, snapshot.host_uuid)
    }

    /// The host as it is now, to save.
    pub fn snapshot(&self) -> SimSnapshot {
        SimSnapshot {
            now_ms: u64::try_from(self.clock.now().as_millis()).unwrap_or(u64::MAX),
            corals: self
                .bus
                .snapshot()
                .iter()
                .map(|c| c.state.as_str().to_string())
                .collect(),
            host_uuid: self.host_uuid.clone(),
            world: self.world().borrow().clone(),
        }
    }

    /// Save the host to `path` (atomically), creating its directory.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_vec_pretty(&self.snapshot())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot save the simulation state {}", path.display()))
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

    /// One line saying what is simulated, for the log.
    pub fn describe(&self) -> String {
        let corals = self
            .bus
            .snapshot()
            .iter()
            .map(|c| format!("{} Coral at {}", c.state, c.path))
            .collect::<Vec<_>>()
            .join(", ");
        let world = self.world();
        let vms = world
            .borrow()
            .vms
            .iter()
            .filter(|v| !v.is_a_template && !v.is_control_domain && !v.is_a_snapshot)
            .map(|v| {
                let state = format!("{:?}", v.power_state).to_lowercase();
                format!("VM '{}' {state}", v.name_label)
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "simulated host (virtual time): {corals}; {vms}; xe calls 150 ms, XAPI USB scan 500 ms, re-enumeration 800 ms"
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

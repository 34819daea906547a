//! The built-in simulated host behind `--simulate`, a demo strict as the
//! real thing but without fault injection: one Coral on xHCI port 4 (boot
//! loader at `1-4`, ready at `2-4` 800 ms after its reset, [`bootloader`])
//! and an XCP-ng pool of one host with a running VM `frigate`
//! (auto_poweron) whose asynchronous USB scans see that bus as udev tells
//! them (`pool`), all on a virtual clock, so a run is instant yet reports
//! realistic times. The state is kept in a file between runs, so that `up`,
//! then `status`, then `detach` tell one story.

pub mod bootloader;
pub mod dfu_machine;
mod pool;
pub mod xe_cli;

use crate::clock::{Clock, VirtualClock};
use crate::firmware::{FirmwareImage, FirmwareSource};
use crate::usb::{CoralDevice, CoralState, UsbBus, UsbError, UsbTransport};
use crate::xe::{ArrivesLater, StartedCall, XeError, XeRunner};
use anyhow::Context;
use bootloader::SimBus;
use pool::{Device, Pool};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// The VMs of the simulated pool (one host, each running at first).
pub const SIMULATED_VMS: &[&str] = &["frigate"];

/// The simulated host's /etc/xensource/usb-policy.conf: xapi's default
/// rules (see xapi-usb.md).
pub const SIMULATED_USB_POLICY: &str =
    "# Simulated XCP-ng host: xapi's default rules (see xapi-usb.md).
DENY: class=02 # communications
DENY: class=0a # CDC data
DENY: class=0b # smart card
DENY: class=e0 # wireless controller
ALLOW: # everything else
";

/// Env var naming the file that keeps the `--simulate` host between runs.
pub const SIM_STATE_ENV: &str = "CORAL_SIM_STATE";

/// The mode of the simulation's private directory: its user's alone.
const DIR_MODE: u32 = 0o700;
/// The mode of the simulation's state file.
const STATE_MODE: u32 = 0o600;

/// Where `--simulate` keeps its host between runs; the one place that
/// decides it ([`sim_paths`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimPaths {
    /// The private directory (0700, this user's) that holds the host's own
    /// root, and by default its state file.
    pub dir: PathBuf,
    /// The state file.
    pub state: PathBuf,
    /// The simulated host's own file system root (its /etc, /var/lib/coral).
    pub root: PathBuf,
}

/// Where `--simulate` keeps its host:
/// - `$CORAL_SIM_STATE=FILE`: the state in FILE, the root in the private
///   directory `FILE.root/`;
/// - else the private directory `$XDG_RUNTIME_DIR/coral-sim/`, or
///   `$TMPDIR/coral-sim-<uid>/` (default `/tmp`), holding `state.json` and
///   `root/`.
///
/// An existing private directory is refused when it is a symlink, not a
/// directory, another user's, or writable by group or others: in a shared
/// /tmp another user could have planted it to read or redirect the writes.
pub fn sim_paths() -> anyhow::Result<SimPaths> {
    let paths = match std::env::var_os(SIM_STATE_ENV).filter(|v| !v.is_empty()) {
        Some(file) => {
            let state = PathBuf::from(file);
            let root = state.with_extension("root");
            SimPaths {
                dir: root.clone(),
                state,
                root,
            }
        }
        None => {
            let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
                Some(runtime) => PathBuf::from(runtime).join("coral-sim"),
                None => std::env::temp_dir()
                    .join(format!("coral-sim-{}", crate::atomic_file::effective_uid())),
            };
            SimPaths {
                state: dir.join("state.json"),
                root: dir.join("root"),
                dir,
            }
        }
    };
    match std::fs::symlink_metadata(&paths.dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        _ => check_private(&paths.dir)?,
    }
    Ok(paths)
}

impl SimPaths {
    /// Create the private directory (0700) when missing, then check it
    /// (before anything is written under it).
    pub fn prepare(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", self.dir.display()))
            }
        }
        check_private(&self.dir)
    }
}

/// `dir` is a real directory of this user's that no one else may write.
fn check_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |why: String| {
        crate::error::fail_then(
            crate::error::FailureKind::Other,
            format!("the simulation directory {} {why}", dir.display()),
            crate::error::NextStep::RemoveUnsafe {
                path: dir.display().to_string(),
            },
        )
    };
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir("is a symlink".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    let uid = crate::atomic_file::effective_uid();
    if meta.uid() != uid {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not to this user (uid {uid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

/// The host as saved between runs.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// Virtual time reached (ms).
    now_ms: u64,
    /// Each Coral's identity (`uninitialized` or `ready`), xHCI ports 4, 5, …
    corals: Vec<String>,
    /// The pool.
    pool: Pool,
}

/// The simulated Coral + XCP-ng host.
pub struct SimulatedHost {
    inner: Rc<Inner>,
    host_uuid: String,
    bus: HostBus,
    xe: HostXe,
}

/// What the bus and `xe` of the host share.
struct Inner {
    clock: Rc<VirtualClock>,
    bus: SimBus,
    pool: RefCell<Pool>,
    /// The bus as XAPI was last told of it.
    last_seen: RefCell<Vec<CoralDevice>>,
}

impl SimulatedHost {
    /// A host with `frigate` running and its Coral in `coral`: uninitialized
    /// (right after a power loss, boot loader at `1-4`) or ready (at `2-4`,
    /// its PUSB listed, no VUSB yet).
    pub fn new(coral: CoralState) -> Self {
        let clock = Rc::new(VirtualClock::new());
        let bus = SimBus::new(clock.clone(), &[coral]);
        let pool = Pool::new(
            "xcp-ng-sim",
            SIMULATED_VMS,
            as_xapi_devices(&bus.snapshot()),
        );
        Self::from_parts(clock, bus, pool)
    }

    fn from_parts(clock: Rc<VirtualClock>, bus: SimBus, pool: Pool) -> Self {
        let last_seen = RefCell::new(bus.snapshot());
        let host_uuid = pool.host_uuid().to_string();
        let inner = Rc::new(Inner {
            clock,
            bus,
            pool: RefCell::new(pool),
            last_seen,
        });
        SimulatedHost {
            bus: HostBus(inner.clone()),
            xe: HostXe(inner.clone()),
            inner,
            host_uuid,
        }
    }

    /// The host saved in `path`, or a new one (see [`SimulatedHost::new`])
    /// when there is none yet.
    pub fn load_or_new(path: &Path, coral: CoralState) -> anyhow::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new(coral)),
            Err(e) => {
                let path = path.display();
                anyhow::bail!("cannot read the simulation state {path}: {e}")
            }
        };
        let snapshot: Snapshot = serde_json::from_str(&text).with_context(|| {
            let path = path.display();
            format!("bad simulation state {path}; delete it to start over")
        })?;
        let clock = Rc::new(VirtualClock::new());
        clock.advance(Duration::from_millis(snapshot.now_ms));
        let corals: Vec<CoralState> = (snapshot.corals.iter())
            .map(|s| match s.as_str() {
                "ready" => CoralState::Ready,
                _ => CoralState::Uninitialized,
            })
            .collect();
        let bus = SimBus::new(clock.clone(), &corals);
        let mut pool = snapshot.pool;
        // A Coral saved while re-enumerating is back as what it became:
        // XAPI hears of it as udev would tell it.
        let devices = as_xapi_devices(&bus.snapshot());
        if *pool.bus() != devices {
            pool.set_bus(devices, clock.now());
        }
        Ok(Self::from_parts(clock, bus, pool))
    }

    /// Save the host to `path` (atomically), creating its directory.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let now = self.inner.clock.now();
        self.inner.pool.borrow_mut().advance(now);
        let snapshot = Snapshot {
            now_ms: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            corals: (self.inner.bus.identities().iter())
                .map(|c| c.as_str().to_string())
                .collect(),
            pool: self.inner.pool.borrow().clone(),
        };
        let text = serde_json::to_vec_pretty(&snapshot)?;
        // The directory is the private one `sim_paths` checked.
        crate::atomic_file::write(path, &text, STATE_MODE)
            .with_context(|| format!("cannot save the simulation state {}", path.display()))
    }

    /// The virtual clock everything runs on.
    pub fn clock(&self) -> &dyn Clock {
        self.inner.clock.as_ref()
    }

    /// The simulated USB bus, as the product sees it: every change it
    /// shows reaches XAPI as a udev event would, each starting a scan.
    pub fn bus(&self) -> &dyn UsbBus {
        &self.bus
    }

    /// The simulated `xe`.
    pub fn xe(&self) -> &dyn XeRunner {
        &self.xe
    }

    /// The simulated host's uuid (its "inventory").
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// Coral `index` browns out: it comes back at once as a fresh boot loader.
    pub fn brownout(&self, index: usize) {
        self.inner.bus.brownout(index);
    }

    /// One line saying what is simulated, for the log.
    pub fn describe(&self) -> String {
        let corals = (self.inner.bus.snapshot().iter())
            .map(|c| format!("{} Coral at {}", c.state, c.path))
            .collect::<Vec<_>>()
            .join(", ");
        let now = self.inner.clock.now();
        self.inner.pool.borrow_mut().advance(now);
        let vms = (self.inner.pool.borrow().vm_states().iter())
            .map(|(name, state)| format!("VM '{name}' {state}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "simulated host (virtual time): {corals}; {vms}; xe calls {} ms, XAPI USB scan {} ms, re-enumeration {} ms",
            pool::CALL_MS,
            pool::SCAN_MS,
            bootloader::REENUMERATE_AFTER.as_millis()
        )
    }
}

impl Inner {
    /// udev: when the bus differs from what XAPI was last told, XAPI is
    /// told (and scans). A re-enumeration seen as "gone" then "back" is two
    /// events and two scans, as on a real host.
    fn sync(&self) {
        let now_present = self.bus.snapshot();
        if *self.last_seen.borrow() != now_present {
            let devices = as_xapi_devices(&now_present);
            self.pool.borrow_mut().set_bus(devices, self.clock.now());
            *self.last_seen.borrow_mut() = now_present;
        }
    }
}

/// The host's bus, seen through udev.
struct HostBus(Rc<Inner>);

impl UsbBus for HostBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        self.0.sync();
        self.0.bus.list_corals()
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        self.0.bus.open(device)
    }
}

/// The host's `xe`: each call costs its time on the virtual clock.
struct HostXe(Rc<Inner>);

impl XeRunner for HostXe {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        self.0.sync();
        let clock = &self.0.clock;
        let (result, took) = self.0.pool.borrow_mut().execute(args, clock.now());
        if took > timeout {
            // The caller gives up; xapi carries on regardless.
            clock.sleep(timeout);
            let args = args.to_vec();
            return Err(XeError::TimedOut {
                args,
                after: timeout,
            });
        }
        clock.sleep(took);
        result.map_err(|stderr| XeError::from_output(args, 1, &stderr))
    }

    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        self.0.sync();
        let clock = self.0.clock.as_ref();
        let began = clock.now();
        let (result, took) = self.0.pool.borrow_mut().execute(args, began);
        Box::new(ArrivesLater {
            clock,
            began,
            took,
            timeout,
            args: args.to_vec(),
            answer: result.map_err(|stderr| XeError::from_output(args, 1, &stderr)),
        })
    }
}

/// The Corals as XAPI's scan sees them.
fn as_xapi_devices(corals: &[CoralDevice]) -> Vec<Device> {
    (corals.iter())
        .map(|c| Device {
            path: c.path.to_string(),
            ready: c.state == CoralState::Ready,
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

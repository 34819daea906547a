//! A fake `xe` for end-to-end tests: answers one command line against the
//! simulated XAPI pool kept in a JSON state file (never packaged).
//!
//! Environment:
//! - `CORAL_XE_SIM_STATE` (required): the `SimState` file; calls are
//!   serialized by an exclusive lock on `<state>.lock`.
//! - `CORAL_XE_SIM_USB`: a bus file (JSON array of `SimUsbDevice`) written
//!   by the USB emulator at every enumeration change; when it differs from
//!   what the host had, XAPI is told as udev would (an asynchronous scan).
//! - `CORAL_XE_SIM_HOST`: the host that bus belongs to (default: the first).
//! - `CORAL_XE_SIM_QEMU`: `8.3` or `8.2`: a successful `vm-start` marks the
//!   node of each of the VM's USB devices as that version's `usb_reset.py
//!   attach` does (see [`usb_reset_marks`]); unset: no marks (another
//!   version, or no view of QEMU).
//!
//! The call's simulated duration is slept in real time after the state is
//! saved; a hanging call sleeps until it is killed.

use anyhow::Context;
use coral_testkit::xapi::{
    coral_bootloader_device, coral_ready_device, PowerState, SimState, SimUsbDevice, Vusb, World,
    WorldConfig,
};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--sim-setup") {
        return match setup(&args[1..]) {
            Ok(host) => {
                println!("{host}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("coral-xe-sim --sim-setup: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    if args.first().map(String::as_str) == Some("--sim-settle") {
        // Complete everything due by now (a VM start still "in flight") and save.
        return match settle() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("coral-xe-sim --sim-settle: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(&args) {
        Ok((stdout, stderr, status, duration)) => {
            if duration == Duration::MAX {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            std::thread::sleep(duration);
            print!("{stdout}");
            eprint!("{stderr}");
            let _ = std::io::stdout().flush();
            ExitCode::from(status as u8)
        }
        Err(err) => {
            eprintln!("coral-xe-sim: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<(String, String, i32, Duration)> {
    let state_path = PathBuf::from(
        std::env::var_os("CORAL_XE_SIM_STATE").context("CORAL_XE_SIM_STATE is not set")?,
    );
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_path.with_extension("lock"))
        .context("cannot open the state lock")?;
    lock.lock().context("cannot lock the state")?;

    let mut state = SimState::load(&state_path)?;
    let now = state.now();
    if let Some(bus) = std::env::var_os("CORAL_XE_SIM_USB") {
        sync_bus(&mut state, Path::new(&bus), now)?;
    }
    let result = state.world.execute(args, now);
    if args.first().map(String::as_str) == Some("vm-start") && result.output.status == 0 {
        usb_reset_marks(&state.world, args)?;
    }
    state.save(&state_path)?;
    drop(lock);
    let out = result.output;
    Ok((out.stdout, out.stderr, out.status, result.duration))
}

/// `--sim-setup [--vm-power halted|running] [--coral bootloader|ready|attached]
/// [--call-ms N] [--scan-ms N] [--scan-read-ms N] [--shutdown-ms N]
/// [--start-ms N]`: write a one-host pool with VM `frigate` to
/// `CORAL_XE_SIM_STATE` (for benchmarks and demos); prints the host uuid.
/// The scan is modelled by time: each USB change (the emulator's bus file
/// stamps each with its time) starts a scan that reads the bus
/// `--scan-read-ms` after its start and commits `--scan-ms` after it,
/// however many calls come in between (scans of a host run in order).
fn setup(args: &[String]) -> anyhow::Result<String> {
    let state_path = PathBuf::from(
        std::env::var_os("CORAL_XE_SIM_STATE").context("CORAL_XE_SIM_STATE is not set")?,
    );
    let mut config = WorldConfig::default();
    let mut power = PowerState::Halted;
    let mut coral = "bootloader".to_string();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--vm-power" if value == "running" => power = PowerState::Running,
            "--vm-power" if value == "halted" => power = PowerState::Halted,
            "--coral" => coral = value.clone(),
            "--call-ms" => config.call_ms = number()?,
            "--scan-ms" => config.scan_delay_ms = number()?,
            "--scan-read-ms" => config.scan_read_ms = number()?,
            "--shutdown-ms" => config.shutdown_ms = number()?,
            "--start-ms" => config.start_ms = number()?,
            _ => anyhow::bail!("unknown option {flag} {value}"),
        }
    }
    let mut world = World::new(config);
    let host = world.add_host("xcp-bench");
    let running = power == PowerState::Running;
    let vm = world.add_vm("frigate", power, running.then_some(host.as_str()));
    let device = match coral.as_str() {
        "bootloader" => coral_bootloader_device("1-4"),
        "ready" | "attached" => coral_ready_device("2-4"),
        other => anyhow::bail!("--coral {other}: bootloader, ready or attached"),
    };
    world.set_usb_devices(&host, vec![device], Duration::ZERO);
    world.scan_now(&host);
    world.pending_scans.clear();
    if coral == "attached" {
        let pusb = world.pusbs[0].clone();
        world.pusbs[0].passthrough_enabled = true;
        let uuid = world.new_uuid();
        world.vusbs.push(Vusb {
            uuid,
            vm_uuid: vm,
            usb_group_uuid: pusb.usb_group_uuid,
            currently_attached: running,
            other_config: Default::default(),
        });
    }
    SimState::starting_now(world).save(&state_path)?;
    Ok(host)
}

fn settle() -> anyhow::Result<()> {
    let state_path = PathBuf::from(
        std::env::var_os("CORAL_XE_SIM_STATE").context("CORAL_XE_SIM_STATE is not set")?,
    );
    let mut state = SimState::load(&state_path)?;
    let now = state.now();
    state.world.advance(now);
    state.save(&state_path)
}

/// The bus file: the emulator's log of bus changes, each with its time
/// (`{"events": [{"unix_ms": …, "devices": […]}, …]}`), or one snapshot (a
/// JSON array of devices, for hand-made set-ups).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum BusFile {
    Events { events: Vec<BusEvent> },
    Snapshot(Vec<SimUsbDevice>),
}

/// One udev add/remove as the emulator saw it.
#[derive(serde::Deserialize)]
struct BusEvent {
    unix_ms: u64,
    devices: Vec<SimUsbDevice>,
}

/// Tell XAPI about the USB bus as udev would. With an event log, every
/// change since the last call reaches the world at its own time (each
/// schedules a scan, and scans commit in order), so a Coral that dropped and
/// came back between two calls still costs its PUSB, group and VUSB. With a
/// bare snapshot, the change happened when the file was written (its mtime);
/// a device that changed identity re-enumerated: udev reported its removal
/// first (some time between the previous call and the change) and its
/// addition then, each with a scan.
fn sync_bus(state: &mut SimState, bus: &Path, now: Duration) -> anyhow::Result<()> {
    let file: BusFile = match std::fs::read_to_string(bus) {
        Ok(text) if text.trim().is_empty() => BusFile::Snapshot(Vec::new()),
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("bad bus file {}", bus.display()))?,
        Err(_) => BusFile::Snapshot(Vec::new()),
    };
    let host_uuid = match std::env::var("CORAL_XE_SIM_HOST") {
        Ok(uuid) => uuid,
        Err(_) => state
            .world
            .hosts
            .first()
            .map(|h| h.uuid.clone())
            .context("the simulated pool has no host")?,
    };
    let Some(current) = state.world.host(&host_uuid).map(|h| h.usb_devices.clone()) else {
        return Ok(());
    };
    let devices = match file {
        BusFile::Events { events } => {
            let now_ms = now.as_millis() as u64;
            let seen = state.bus_seen_unix_ms;
            for event in events.into_iter().filter(|e| e.unix_ms > seen) {
                state.bus_seen_unix_ms = event.unix_ms;
                // The emulator's bus holds the Corals only: the host's other
                // devices (a test's disk, dongle…) stay as they are.
                let mut devices: Vec<SimUsbDevice> = state
                    .world
                    .host(&host_uuid)
                    .map(|h| h.usb_devices.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|d| !is_coral(d))
                    .collect();
                devices.extend(event.devices);
                // Not a change (the emulator's first event repeats what the
                // pool already knows): no udev event, no scan.
                if state.world.host(&host_uuid).map(|h| &h.usb_devices) == Some(&devices) {
                    continue;
                }
                let at = event
                    .unix_ms
                    .saturating_sub(state.origin_unix_ms)
                    .min(now_ms);
                state
                    .world
                    .set_usb_devices(&host_uuid, devices, Duration::from_millis(at));
            }
            return Ok(());
        }
        BusFile::Snapshot(devices) => devices,
    };
    if current == devices {
        return Ok(());
    }
    let last_ms = state.world.calls.last().map(|c| c.at_ms).unwrap_or(0);
    let changed_ms = std::fs::metadata(bus)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|t| (t.as_millis() as u64).saturating_sub(state.origin_unix_ms))
        .unwrap_or(now.as_millis() as u64)
        .clamp(last_ms, now.as_millis() as u64);
    let kept: Vec<SimUsbDevice> = current
        .iter()
        .filter(|d| devices.contains(d))
        .cloned()
        .collect();
    if kept.len() < current.len() && kept.len() < devices.len() {
        let removed_ms = last_ms + (changed_ms - last_ms) / 2;
        state
            .world
            .set_usb_devices(&host_uuid, kept, Duration::from_millis(removed_ms));
    }
    state
        .world
        .set_usb_devices(&host_uuid, devices, Duration::from_millis(changed_ms));
    Ok(())
}

/// A Coral in either identity (what the emulator's bus file describes).
fn is_coral(device: &SimUsbDevice) -> bool {
    matches!(
        (device.vendor_id.as_str(), device.product_id.as_str()),
        ("1a6e", "089a") | ("18d1", "9302")
    )
}

/// What xapi's `usb_reset.py attach <path> -d <domid>` leaves at a VM start
/// for each of the VM's USB devices on this host (xapi-usb.md, "A drop that
/// XAPI does not see"): it resolves the path to `/dev/bus/usb/BBB/DDD`
/// through sysfs `busnum`/`devnum` (the emulated sysfs: this process runs
/// under the emulator's umockdev preload), then
/// - 8.3: copies that node into QEMU's chroot
///   `$CORAL_QEMU_ROOT/root-<domid>/dev/bus/usb/BBB/DDD`, owned by
///   `qemu_base + domid`;
/// - 8.2: chowns the node itself to `qemu_base + domid` and allows its
///   `c 189:MINOR` in `$CORAL_CGROUP_DEVICES/qemu-<domid>/devices.list`.
///
/// `qemu_base` is the uid of that account in `$CORAL_PASSWD`
/// (usb_reset.py: `pwd.getpwnam("qemu_base").pw_uid`).
fn usb_reset_marks(world: &World, args: &[String]) -> anyhow::Result<()> {
    let Ok(version) = std::env::var("CORAL_XE_SIM_QEMU") else {
        return Ok(());
    };
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .with_context(|| format!("CORAL_XE_SIM_QEMU={version} needs {name}"))
    };
    let passwd = var("CORAL_PASSWD")?;
    let base = coral::usb::qemu_node::qemu_base_uid(&passwd)
        .with_context(|| format!("no qemu_base account in {}", passwd.display()))?;
    let host = std::env::var("CORAL_XE_SIM_HOST").ok();
    let testbed = std::env::var_os("UMOCKDEV_DIR").map(PathBuf::from);
    for uuid in args.iter().filter_map(|a| a.strip_prefix("uuid=")) {
        let Some(vm) = world.vm(uuid) else { continue };
        let Ok(domid) = u32::try_from(vm.dom_id) else {
            continue;
        };
        let owner = base + domid;
        let paths = world
            .vusbs
            .iter()
            .filter(|v| v.vm_uuid == uuid)
            .filter_map(|v| {
                world
                    .pusbs
                    .iter()
                    .find(|p| p.usb_group_uuid == v.usb_group_uuid)
            })
            .filter(|p| host.as_deref().is_none_or(|h| h == p.host_uuid))
            .map(|p| p.device.path.clone());
        for path in paths {
            let Some(node) = coral::usb::qemu_node::usb_node(Path::new("/sys"), &path) else {
                continue;
            };
            match version.as_str() {
                "8.3" => {
                    let copy = var("CORAL_QEMU_ROOT")?
                        .join(format!("root-{domid}/dev"))
                        .join(node.relative());
                    std::fs::create_dir_all(copy.parent().context("a node's directory")?)?;
                    std::fs::write(&copy, b"")?;
                    std::os::unix::fs::chown(&copy, Some(owner), Some(owner))?;
                }
                "8.2" => {
                    let dev = testbed.clone().unwrap_or_default().join("dev");
                    std::os::unix::fs::chown(dev.join(node.relative()), Some(owner), Some(owner))?;
                    let dir = var("CORAL_CGROUP_DEVICES")?.join(format!("qemu-{domid}"));
                    std::fs::create_dir_all(&dir)?;
                    let mut list = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join("devices.list"))?;
                    writeln!(list, "c 189:{} rwm", node.minor)?;
                }
                other => anyhow::bail!("CORAL_XE_SIM_QEMU={other}: 8.2 or 8.3"),
            }
        }
    }
    Ok(())
}

//! End-to-end harness: runs the built `coral` binary (or `$CORAL_TEST_BIN`,
//! e.g. the release build) through the real libusb against the
//! umockdev-emulated Coral (`tests/testkit/emulator/coral_emulator.py`), with
//! a fake `xe` on PATH (`coral-xe-sim`) whose USB scan follows the emulated
//! bus.

use crate::xapi::{coral_ready_device, PowerState, SimState, SimUsbDevice, World, WorldConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tempfile::TempDir;

/// The repository's root (where the product's Cargo.toml is).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The running test executable, e.g. `target/debug/deps/e2e_up-1a2b…`.
fn test_exe() -> PathBuf {
    std::env::current_exe().expect("the test executable's path")
}

/// The binary under test: `$CORAL_TEST_BIN`, else the `coral` cargo built
/// for this test run (next to the test executable's `deps/` directory).
pub fn coral_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CORAL_TEST_BIN") {
        return PathBuf::from(bin);
    }
    let exe = test_exe();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable under <target>/<profile>/deps");
    profile_dir.join("coral")
}

/// The fake `xe`, built once per test process on first use (it is a binary
/// of this dev-only crate, so cargo does not build it for the product's
/// tests): `$CARGO build -p coral-testkit --bin coral-xe-sim` into the
/// target directory cargo reports (`CARGO_TARGET_DIR` honoured).
pub fn xe_sim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_xe_sim).clone()
}

fn build_xe_sim() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = repo_root().join("Cargo.toml");
    let metadata = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .expect("run cargo metadata");
    assert!(
        metadata.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).expect("cargo metadata JSON");
    let target_dir = PathBuf::from(
        metadata["target_directory"]
            .as_str()
            .expect("cargo metadata names the target directory"),
    );
    let out = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "coral-testkit",
            "--bin",
            "coral-xe-sim",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .expect("run cargo build for coral-xe-sim");
    assert!(
        out.status.success(),
        "cargo build -p coral-testkit --bin coral-xe-sim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target_dir.join("debug").join("coral-xe-sim");
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

/// A test cannot run here: a prerequisite (umockdev, ../shared/firmware,
/// dfu-util) is missing. With `CI=true` this panics, so the run fails;
/// otherwise it prints the reason, appends `<test>: <reason>` to the file
/// `$CORAL_SKIP_LOG` names (scripts/test.sh counts those lines), and the
/// caller returns early.
pub fn skip(reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let log = std::env::var_os("CORAL_SKIP_LOG").map(PathBuf::from);
    skip_with(ci, log.as_deref(), &current_test(), reason);
}

/// This test's name, e.g. `e2e_init::a_stall_leaves_…`.
pub fn current_test() -> String {
    // The test crate's name is the executable's, before cargo's `-<hash>`.
    let exe = test_exe();
    let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
    let krate = stem.rsplit_once('-').map_or(stem, |(name, _)| name);
    format!(
        "{krate}::{}",
        std::thread::current().name().unwrap_or("main")
    )
}

/// [`skip`] with its environment spelled out (for testing it).
pub fn skip_with(ci: bool, log: Option<&Path>, test: &str, reason: &str) {
    if ci {
        panic!("{test}: {reason} (CI=true: a missing prerequisite fails the run)");
    }
    eprintln!("skipped {test}: {reason}");
    if let Some(log) = log {
        use std::io::Write;
        let line = format!("{test}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot record the skip in {}: {e}", log.display());
        }
    }
}

/// Where one run of the binary keeps what it would otherwise keep on the
/// machine: `CORAL_STATE_DIR`, `CORAL_CONFIG`, `CORAL_SIM_STATE`, each in a
/// fresh directory of this test process (removed when it exits). Every test
/// that runs `coral` sets these first; a test that needs a config under
/// `--root` removes `CORAL_CONFIG` after.
pub fn isolated_env() -> Vec<(String, String)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static DIR: OnceLock<TempDir> = OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let run = base
        .path()
        .join(format!("run-{}", NEXT.fetch_add(1, Ordering::SeqCst)));
    let at = |name: &str| run.join(name).display().to_string();
    vec![
        ("CORAL_STATE_DIR".into(), at("state")),
        ("CORAL_CONFIG".into(), at("coral.toml")),
        ("CORAL_SIM_STATE".into(), at("coral-sim.json")),
    ]
}

/// Assert that a run of the binary succeeded, showing its stderr if not.
pub fn assert_succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where the tests look for the real firmware images:
/// `$CORAL_TEST_FIRMWARE_DIR`, else `../shared/firmware` beside the
/// repository (a plain clone has none; the images are never committed).
pub fn shared_firmware_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CORAL_TEST_FIRMWARE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let root = repo_root();
    let root = root.canonicalize().unwrap_or(root);
    root.parent().unwrap_or(&root).join("shared/firmware")
}

/// A firmware image from [`shared_firmware_dir`], or None (a [`skip`] whose
/// reason says the image is absent and the command that supplies it).
pub fn shared_firmware(name: &str) -> Option<PathBuf> {
    let dir = shared_firmware_dir();
    let path = dir.join(name);
    if path.exists() {
        return Some(path);
    }
    skip(&format!(
        "the firmware image {name} is absent from {}; {}",
        dir.display(),
        how_to_supply(name, &dir)
    ));
    None
}

/// The command that puts the image `name` into `dir` (its URL from the
/// manifest; the default image through `coral firmware fetch`).
fn how_to_supply(name: &str, dir: &Path) -> String {
    let manifest = include_str!("../../../firmware/manifest.txt");
    let mut entries = manifest
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    let first = entries.next();
    if first.as_ref().is_some_and(|e| e.first() == Some(&name)) {
        return format!(
            "`cargo run -- firmware fetch --dir {}` supplies it",
            dir.display()
        );
    }
    match (first.into_iter().chain(entries)).find(|e| e.first() == Some(&name)) {
        Some(entry) if entry.len() >= 4 => format!(
            "`curl -fsSL --create-dirs -o {} {}` supplies it",
            dir.join(name).display(),
            entry[3]
        ),
        _ => format!("copy {name} into {}", dir.display()),
    }
}

/// True when umockdev and its Python bindings are installed (CI installs
/// them); false is a [`skip`].
pub fn umockdev_available() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import gi; gi.require_version('UMockdev', '1.0')"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        && Path::new("/usr/bin/umockdev-wrapper").exists();
    if !ok {
        skip("umockdev is not installed (scripts/test.sh installs it)");
    }
    ok
}

/// True when an end-to-end firmware upload can run: umockdev is installed
/// and the shared `apex_latest_single_ep.bin` is there; false is a [`skip`].
pub fn umockdev_and_firmware_available() -> bool {
    umockdev_available() && shared_firmware("apex_latest_single_ep.bin").is_some()
}

/// What one emulated run produced.
pub struct Run {
    /// Exit status of the command.
    pub status: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// The emulator's record: requests, bytes received, devices, events.
    pub result: Value,
}

impl Run {
    /// Control requests as (bmRequestType, bRequest).
    pub fn requests(&self) -> Vec<(u64, u64)> {
        self.result["requests"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["type"].as_u64().unwrap_or(0),
                            r["request"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many requests with this bRequest and direction.
    pub fn count(&self, request_type: u64, request: u64) -> usize {
        self.requests()
            .iter()
            .filter(|r| **r == (request_type, request))
            .count()
    }

    /// The image the boot loader received in its last complete download.
    pub fn received(&self) -> Vec<u8> {
        hex::decode(self.result["received"].as_str().unwrap_or("")).unwrap_or_default()
    }

    /// Devices present at the end, as (path, "vid:pid").
    pub fn devices(&self) -> Vec<(String, String)> {
        self.result["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            d["path"].as_str().unwrap_or("").to_string(),
                            d["id"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The lines coral printed as its error (`coral: …`).
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("coral: "))
            .collect()
    }
}

/// An emulated Coral with `emulator_args`, running `command` inside it.
pub fn emulate(emulator_args: &[String], command: &[String], env: &[(String, String)]) -> Run {
    let start = StartingState::take(env);
    let mut attempt = 0;
    loop {
        let run = emulate_once(emulator_args, command, env);
        let hit =
            run.stderr.contains(UMOCKDEV_SEND_RACE) || run.stderr.contains(EMULATOR_LOST_EVENT);
        if !hit || attempt == UMOCKDEV_RACE_RETRIES {
            return run;
        }
        attempt += 1;
        eprintln!(
            "umockdev aborted a uevent send (a known race of the test tool, not coral); repeating the run from the same starting state ({attempt}/{UMOCKDEV_RACE_RETRIES})"
        );
        start.restore();
    }
}

/// What umockdev 0.17 prints when it aborts the process sending a uevent
/// because a listener's socket vanished between being found and being
/// connected to. libusb opens and closes udev monitors at every poll, so the
/// race is real but rare (about 1 in 300 emulated runs on these machines);
/// the emulator then loses its device or dies. It is the test tool failing,
/// not coral, so such a run is repeated from the same starting state.
const UMOCKDEV_SEND_RACE: &str = "sendmsg_one: cannot connect to client's event socket";
/// What the emulator prints when every attempt to send one uevent was lost
/// to that race (or its forked sender hung).
const EMULATOR_LOST_EVENT: &str = "coral_emulator: uevent lost";
/// How often a run hit by that race is repeated.
const UMOCKDEV_RACE_RETRIES: usize = 2;

/// The files a run may change outside the emulator (the fake xe's pool and
/// the watcher's state), as they were before it, to repeat a run.
struct StartingState {
    files: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl StartingState {
    fn take(env: &[(String, String)]) -> Self {
        let path = |key: &str| {
            env.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| PathBuf::from(v))
        };
        let files = [
            path("CORAL_XE_SIM_STATE"),
            path("CORAL_STATE_DIR").map(|dir| dir.join("mappings.json")),
        ]
        .into_iter()
        .flatten()
        .map(|file| {
            let bytes = std::fs::read(&file).ok();
            (file, bytes)
        })
        .collect();
        StartingState { files }
    }

    fn restore(&self) {
        for (file, bytes) in &self.files {
            match bytes {
                Some(bytes) => std::fs::write(file, bytes).expect("restore the starting state"),
                None => {
                    let _ = std::fs::remove_file(file);
                }
            }
        }
    }
}

/// One emulated run.
fn emulate_once(emulator_args: &[String], command: &[String], env: &[(String, String)]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let result = dir.path().join("result.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("emulator/coral_emulator.py");
    let mut cmd = Command::new("umockdev-wrapper");
    cmd.arg("/usr/bin/python3")
        .arg(&script)
        .args(emulator_args)
        .arg("--result")
        .arg(&result)
        .arg("--")
        .args(command)
        .current_dir(dir.path())
        .env_remove("CORAL_FIRMWARE")
        .env(
            "CORAL_FIRMWARE_DIR",
            dir.path().join("no-installed-firmware"),
        )
        .env("CORAL_LOCK", dir.path().join("coral.lock"))
        // Never the machine's /var/lib/coral or /etc/coral/coral.toml.
        .envs(isolated_env());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the emulator");
    let result = std::fs::read_to_string(&result)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        result,
    }
}

/// `coral <args>` under an emulated Coral.
pub fn coral_under(emulator_args: &[&str], coral_args: &[&str], env: &[(String, String)]) -> Run {
    let mut command = vec![coral_bin().display().to_string()];
    command.extend(coral_args.iter().map(|s| s.to_string()));
    let emulator: Vec<String> = emulator_args.iter().map(|s| s.to_string()).collect();
    emulate(&emulator, &command, env)
}

/// A fake XCP-ng pool behind a fake `xe` on PATH.
pub struct FakeXapi {
    dir: TempDir,
    /// The state file.
    pub state: PathBuf,
    /// The bus file the emulator writes and the fake xe reads.
    pub bus: PathBuf,
    /// This host's uuid (the inventory).
    pub host_uuid: String,
}

impl FakeXapi {
    /// A pool from `world`, whose time starts now; `host_uuid` is this host.
    pub fn new(world: World, host_uuid: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("xapi.json");
        SimState::starting_now(world)
            .save(&state)
            .expect("save the world");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(xe_sim_bin(), bin.join("xe")).unwrap();
        std::fs::write(
            dir.path().join("xensource-inventory"),
            format!("PRIMARY_DISK='/dev/sda'\nINSTALLATION_UUID='{host_uuid}'\n"),
        )
        .unwrap();
        FakeXapi {
            bus: dir.path().join("usb-bus.json"),
            state,
            host_uuid: host_uuid.to_string(),
            dir,
        }
    }

    /// Environment for coral: `xe` on PATH, the state, the bus, the inventory.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        vec![
            ("PATH".into(), path),
            // The host's own state directory (kept across runs, as on a host).
            (
                "CORAL_STATE_DIR".into(),
                self.dir.path().join("state").display().to_string(),
            ),
            (
                "CORAL_XE_SIM_STATE".into(),
                self.state.display().to_string(),
            ),
            ("CORAL_XE_SIM_USB".into(), self.bus.display().to_string()),
            ("CORAL_XE_SIM_HOST".into(), self.host_uuid.clone()),
            (
                "CORAL_INVENTORY".into(),
                self.dir
                    .path()
                    .join("xensource-inventory")
                    .display()
                    .to_string(),
            ),
        ]
    }

    /// A one-host pool (see [`pool`]) with VM `name` in `power` and XAPI's
    /// view of one USB device `present`, behind a fake `xe`; returns the
    /// pool, this host's uuid and the VM's.
    pub fn with_vm(
        config: WorldConfig,
        name: &str,
        power: PowerState,
        present: SimUsbDevice,
    ) -> (Self, String, String) {
        let (world, host, vm) = pool(config, name, power, vec![present]);
        (FakeXapi::new(world, &host), host, vm)
    }

    /// `coral <coral_args>` under an emulated Coral (`emulator_args`) that
    /// writes this pool's bus file, with this pool's `xe` on PATH.
    pub fn run(&self, emulator_args: &[&str], coral_args: &[&str]) -> Run {
        self.run_with_env(emulator_args, coral_args, &[])
    }

    /// [`FakeXapi::run`] with more environment (later entries win).
    pub fn run_with_env(
        &self,
        emulator_args: &[&str],
        coral_args: &[&str],
        env: &[(String, String)],
    ) -> Run {
        let mut emulator: Vec<String> = emulator_args.iter().map(|s| s.to_string()).collect();
        emulator.extend(self.bus_args());
        let mut command = vec![coral_bin().display().to_string()];
        command.extend(coral_args.iter().map(|s| s.to_string()));
        let mut all = self.env();
        all.extend(env.iter().cloned());
        emulate(&emulator, &command, &all)
    }

    /// Emulator arguments that make it write the bus file.
    pub fn bus_args(&self) -> Vec<String> {
        vec!["--bus-file".into(), self.bus.display().to_string()]
    }

    /// The pool now, with everything due by now completed.
    pub fn world(&self) -> World {
        let mut state = SimState::load(&self.state).expect("load the world");
        let now = state.now();
        state.world.advance(now);
        state.world
    }

    /// Where to put scratch files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment for a host whose xapi marks QEMU's USB nodes at VM
    /// start as `version` (`8.2` or `8.3`) does, under this pool's
    /// directory: the fake xe makes the marks (`CORAL_XE_SIM_QEMU`), coral
    /// reads them (`CORAL_QEMU_ROOT`, `CORAL_CGROUP_DEVICES`, `CORAL_PASSWD`).
    /// The passwd file's `qemu_base` uid is this test host's own choice.
    pub fn qemu_env(&self, version: &str) -> Vec<(String, String)> {
        let passwd = self.dir.path().join("passwd");
        std::fs::write(
            &passwd,
            format!("root:x:0:0:root:/root:/bin/bash\nqemu_base:x:{QEMU_BASE_UID}:{QEMU_BASE_UID}::/:/sbin/nologin\n"),
        )
        .expect("write the passwd file");
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        vec![
            ("CORAL_XE_SIM_QEMU".into(), version.into()),
            ("CORAL_PASSWD".into(), passwd.display().to_string()),
            ("CORAL_QEMU_ROOT".into(), path("qemu")),
            ("CORAL_CGROUP_DEVICES".into(), path("cgroup-devices")),
        ]
    }
}

/// The `qemu_base` uid of the test hosts' passwd file.
pub const QEMU_BASE_UID: u32 = 65_536;

/// Fast timings for tests (the fake xe sleeps them in real time).
pub fn fast_config() -> WorldConfig {
    WorldConfig {
        scan_delay_ms: 150,
        shutdown_ms: 200,
        start_ms: 100,
        ack_timeout_ms: 500,
        shutdown_timeout_ms: 2_000,
        call_ms: 0,
        ..Default::default()
    }
}

/// A one-host pool (plus a second member) with VM `name` in `power`, and
/// XAPI's view of the USB devices `present` (as its start-up scan saw them).
pub fn pool(
    config: WorldConfig,
    name: &str,
    power: PowerState,
    present: Vec<SimUsbDevice>,
) -> (World, String, String) {
    let mut world = World::new(config);
    let host = world.add_host("xcp-a");
    let other = world.add_host("xcp-b");
    let running = matches!(power, PowerState::Running);
    let vm = world.add_vm(name, power, running.then_some(host.as_str()));
    world.add_vm("frigate-old", PowerState::Halted, None);
    world.set_usb_devices(&host, present, std::time::Duration::ZERO);
    world.scan_now(&host);
    // The other member has a Coral of its own that must never be touched.
    world.set_usb_devices(
        &other,
        vec![coral_ready_device("2-4")],
        std::time::Duration::ZERO,
    );
    world.scan_now(&other);
    world.pending_scans.clear();
    (world, host, vm)
}

/// A pool with VM `frigate` in `power` and one USB device `present`, on
/// [`fast_config`] timings (see [`pool`]): world, this host, the VM.
pub fn frigate_pool(power: PowerState, present: SimUsbDevice) -> (World, String, String) {
    pool(fast_config(), "frigate", power, vec![present])
}

/// The VM power transitions so far, as (from, to).
pub fn power_transitions(world: &World) -> Vec<(PowerState, PowerState)> {
    world.power_history.iter().map(|e| (e.from, e.to)).collect()
}

/// The power transitions of `vm` so far, as (from, to).
pub fn vm_power_transitions(world: &World, vm: &str) -> Vec<(PowerState, PowerState)> {
    world
        .power_history
        .iter()
        .filter(|e| e.vm_uuid == vm)
        .map(|e| (e.from, e.to))
        .collect()
}

/// One restart: a running VM halted, then running again.
pub const ONE_RESTART: [(PowerState, PowerState); 2] = [
    (PowerState::Running, PowerState::Halted),
    (PowerState::Halted, PowerState::Running),
];

/// Nothing half-done: `vm` still runs, never changed power, and has no
/// VUSB on the group of this host's ready Coral at 2-4.
pub fn assert_vm_left_running(world: &World, host: &str, vm: &str) {
    assert_eq!(world.vm(vm).unwrap().power_state, PowerState::Running);
    assert!(world.power_history.is_empty());
    assert!(
        vusbs_on_ready_group(world, host, vm, "2-4").is_empty(),
        "no stray VUSB (rolled back)"
    );
}

/// Commands that change nothing.
pub const READ_COMMANDS: &[&str] = &[
    "pusb-list",
    "usb-group-list",
    "vusb-list",
    "vm-list",
    "host-list",
    "pusb-param-get",
    "vusb-param-get",
    "vm-param-get",
];

/// The VUSBs of `vm` and whether each links the group of this host's ready Coral at `path`.
pub fn vusbs_on_ready_group(world: &World, host: &str, vm: &str, path: &str) -> Vec<(bool, bool)> {
    let group = world
        .pusbs
        .iter()
        .find(|p| p.host_uuid == host && p.device.path == path && p.device.product_id == "9302")
        .map(|p| p.usb_group_uuid.clone());
    world
        .vusbs
        .iter()
        .filter(|v| v.vm_uuid == vm)
        .map(|v| {
            (
                Some(&v.usb_group_uuid) == group.as_ref(),
                v.currently_attached,
            )
        })
        .collect()
}

//! The config file and `coral service` through the built binary, with the
//! fake `xe` (coral-xe-sim) resolving VMs, under a temporary root.

use assert_cmd::Command;
use coral_testkit::e2e::assert_succeeded;
mod support;

use coral_testkit::xapi::{coral_ready_device, PowerState};
use std::path::{Path, PathBuf};
use support::{fast_config, pool, FakeXapi, READ_COMMANDS};

struct Host {
    xapi: FakeXapi,
    root: tempfile::TempDir,
    vm: String,
}

impl Host {
    /// A pool with `frigate` (halted) and `cam 2` (running).
    fn new() -> (Self, String) {
        let (mut world, host, vm) = pool(
            fast_config(),
            "frigate",
            PowerState::Halted,
            vec![coral_ready_device("2-4")],
        );
        let second = world.add_vm("cam 2", PowerState::Running, Some(host.as_str()));
        (
            Host {
                xapi: FakeXapi::new(world, &host),
                root: tempfile::tempdir().unwrap(),
                vm,
            },
            second,
        )
    }

    fn coral(&self) -> Command {
        let mut cmd = Command::cargo_bin("coral").unwrap();
        cmd.envs(support::isolated_env())
            .env_remove("CORAL_CONFIG")
            .env_remove("CORAL_SIM_STATE")
            .envs(self.xapi.env());
        cmd
    }

    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = self
            .coral()
            .args(args)
            .arg("--root")
            .arg(self.root.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn config(&self) -> PathBuf {
        self.root.path().join("etc/coral/coral.toml")
    }

    fn unit(&self) -> PathBuf {
        self.root.path().join("etc/systemd/system/coral-up.service")
    }

    fn enabled(&self) -> bool {
        self.root
            .path()
            .join("etc/systemd/system/multi-user.target.wants/coral-up.service")
            .symlink_metadata()
            .is_ok()
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn install_adds_and_updates_entries_by_uuid_and_one_unit_runs_them_all() {
    let (host, second) = Host::new();
    let (code, out, err) = host.run(&["service", "install", "--vm", "frigate", "--device", "2-4"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let config = read(&host.config());
    assert!(
        config.contains(&format!("vm = \"{}\"", host.vm)),
        "{config}"
    );
    assert!(config.contains("vm_name = \"frigate\"") && config.contains("device = \"2-4\""));
    assert!(host.enabled(), "the unit is enabled");

    // A second VM on a second Coral: a second entry, still one unit.
    let (code, out, err) = host.run(&[
        "service",
        "install",
        "--vm",
        &second,
        "--device",
        "2-1.3",
        "--restart",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let config = read(&host.config());
    assert_eq!(config.matches("[[coral]]").count(), 2, "{config}");
    assert!(
        config.contains("vm_name = \"cam 2\""),
        "name kept for people: {config}"
    );
    let unit = read(&host.unit());
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=/")).unwrap();
    assert!(
        exec.ends_with(" --lock-timeout 30 up"),
        "no VM in the unit: {exec}"
    );
    assert!(unit.lines().any(|l| l == "TimeoutStartSec=240"), "{unit}");

    // Install again for frigate: its entry is updated, not duplicated.
    let (code, out, _) = host.run(&["service", "install", "--vm", "frigate", "--start"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("entry updated"), "{out}");
    let config = read(&host.config());
    assert_eq!(config.matches("[[coral]]").count(), 2);
    assert!(config.contains("start = true"));

    // The Coral of frigate cannot go to another VM as well.
    let (code, _, err) = host.run(&["service", "install", "--vm", &second, "--device", "1-4"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already mapped to VM 'frigate'"), "{err}");

    // Remove one entry, then everything.
    let (code, out, _) = host.run(&["service", "uninstall", "--vm", "frigate"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("entry removed"), "{out}");
    assert_eq!(read(&host.config()).matches("[[coral]]").count(), 1);
    assert!(host.unit().exists() && host.enabled());
    let (code, _, _) = host.run(&["service", "uninstall"]);
    assert_eq!(code, Some(0));
    assert!(!host.unit().exists() && !host.enabled() && !host.config().exists());
}

#[test]
fn an_unknown_vm_is_refused_and_nothing_is_written() {
    let (host, _) = Host::new();
    let (code, _, err) = host.run(&["service", "install", "--vm", "frigat"]);
    assert_eq!(code, Some(8), "{err}");
    assert!(err.contains("'frigat' not found"), "{err}");
    assert!(!host.config().exists() && !host.unit().exists());
}

#[test]
fn a_hand_edit_mistake_is_one_line_with_its_line_number_before_any_xe_call() {
    let (host, _) = Host::new();
    std::fs::create_dir_all(host.config().parent().unwrap()).unwrap();
    std::fs::write(
        host.config(),
        format!(
            "# mine\n[[coral]]\nvm = \"{}\"\ndevice = \"2-4\"\nrestrat = true\n",
            host.vm
        ),
    )
    .unwrap();
    let calls_before = host.xapi.world().calls.len();
    let out = host
        .coral()
        .arg("up")
        .env("CORAL_CONFIG", host.config())
        .env("CORAL_LOCK", host.xapi.dir().join("lock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("coral: ")).unwrap();
    assert!(
        line.contains("coral.toml:5: unknown field `restrat`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(host.xapi.world().calls.len(), calls_before, "no xe call");
}

#[test]
fn up_without_vm_and_without_config_says_what_to_do() {
    let (host, _) = Host::new();
    let out = host
        .coral()
        .arg("up")
        .env("CORAL_CONFIG", host.config())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("coral service install --vm VM"), "{err}");
}

#[test]
fn show_with_vm_prints_the_unit_and_entry_install_would_write_and_writes_nothing() {
    let (host, _) = Host::new();
    let (code, out, err) = host.run(&["service", "show", "--vm", "frigate", "--start"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("[Service]") && out.contains("Before=xapi-domains.service"),
        "{out}"
    );
    assert!(out.contains(&format!("vm = \"{}\"", host.vm)), "{out}");
    assert!(out.contains("start = true"), "{out}");
    assert!(!host.config().exists() && !host.unit().exists());
    let world = host.xapi.world();
    assert!(
        world
            .calls
            .iter()
            .all(|c| READ_COMMANDS.contains(&c.args[0].as_str())),
        "show only reads"
    );
}

#[test]
fn dry_run_install_writes_nothing_and_says_what_it_would() {
    let (host, _) = Host::new();
    let (code, out, err) = host.run(&["--dry-run", "service", "install", "--vm", "frigate"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("would write") && out.contains("would run: systemctl enable"),
        "{out}"
    );
    assert!(!host.config().exists() && !host.unit().exists() && !host.enabled());
}

#[test]
fn a_non_default_config_path_is_passed_to_the_unit() {
    let (host, _) = Host::new();
    let config = host.xapi.dir().join("my coral.toml");
    let out = host
        .coral()
        .args(["service", "install", "--vm", "frigate", "--root"])
        .arg(host.root.path())
        .env("CORAL_CONFIG", &config)
        .output()
        .unwrap();
    assert_succeeded(&out);
    assert!(read(&config).contains("vm_name = \"frigate\""));
    let unit = read(&host.unit());
    assert!(
        unit.contains(&format!(
            "Environment=\"CORAL_CONFIG={}\"",
            config.display()
        )),
        "{unit}"
    );
}

/// The config's entries as (VM uuid, device), in file order.
fn entries(host: &Host) -> Vec<(String, Option<String>)> {
    coral::config::parse(&read(&host.config()), &host.config())
        .unwrap()
        .entries
        .into_iter()
        .map(|e| (e.vm_uuid, e.device))
        .collect()
}

#[test]
fn a_new_device_adds_a_second_coral_and_replace_moves_the_vm_there() {
    let (host, second) = Host::new();
    let frigate = |device: &str| (host.vm.clone(), Some(device.to_string()));
    let cam = (second.clone(), Some("2-1.3".to_string()));
    for args in [
        ["--vm", "frigate", "--device", "2-4"],
        ["--vm", &second, "--device", "2-1.3"],
    ] {
        let (code, out, err) = host.run(&[&["service", "install"][..], &args].concat());
        assert_eq!(code, Some(0), "{out}{err}");
    }

    // Without --replace, another port is a second Coral for the VM, and the output says so.
    let (code, out, err) = host.run(&["service", "install", "--vm", "frigate", "--device", "3-1"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("keeps its entry for the Coral at 2-4: it now has 2 Corals")
            && out.contains(&format!(
                "`coral service install --vm {} --device 3-1 --replace`",
                host.vm
            )),
        "{out}"
    );
    assert_eq!(
        entries(&host),
        vec![frigate("2-4"), cam.clone(), frigate("3-1")]
    );

    // `show` tells what --replace would leave, and writes nothing.
    let before = read(&host.config());
    let (code, out, err) = host.run(&[
        "service",
        "show",
        "--vm",
        "frigate",
        "--device",
        "3-2",
        "--replace",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.matches("[[coral]]").count(), 2, "{out}");
    assert!(
        out.contains("device = \"3-2\"") && !out.contains("device = \"2-4\""),
        "{out}"
    );
    assert_eq!(read(&host.config()), before);

    // With --replace: the VM's entries for other ports go, the other VM's stays.
    let (code, out, err) = host.run(&[
        "service",
        "install",
        "--vm",
        "frigate",
        "--device",
        "3-2",
        "--replace",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("entry moved to the Coral at 3-2 (its entry for 2-4, 3-1 is removed)"),
        "{out}"
    );
    assert_eq!(entries(&host), vec![cam.clone(), frigate("3-2")]);

    // Onto another VM's Coral: refused, nothing written.
    let before = read(&host.config());
    let (code, _, err) = host.run(&[
        "service",
        "install",
        "--vm",
        "frigate",
        "--device",
        "1-1.3",
        "--replace",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already mapped to VM 'cam 2'"), "{err}");
    assert_eq!(read(&host.config()), before);

    // --replace names where the VM goes.
    let (code, _, err) = host.run(&["service", "install", "--vm", "frigate", "--replace"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(read(&host.config()), before);
}

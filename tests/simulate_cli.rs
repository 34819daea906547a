//! The `--simulate` front door: what a newcomer sees from the built binary.

use assert_cmd::Command;
mod support;

use support::{assert_succeeded, shared_firmware};

/// A simulated host of its own (state file in a fresh directory) for one test.
struct Sim {
    dir: tempfile::TempDir,
}

impl Sim {
    fn new() -> Self {
        Sim {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("sim.json")
    }

    /// `coral` against this host.
    fn coral(&self) -> Command {
        let mut cmd = Command::cargo_bin("coral").expect("coral binary");
        // Keep the real host's settings out of the simulation.
        for var in [
            "CORAL_FIRMWARE",
            "CORAL_FIRMWARE_DIR",
            "CORAL_XE",
            "CORAL_INVENTORY",
            "CORAL_CONFIG",
            "CORAL_USB_POLICY",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir")
            .env("CORAL_SIM_STATE", self.state());
        cmd
    }

    /// `coral ARGS` against this host: (succeeded, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.coral().args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn simulated_up_with_restart_recovers_the_coral_and_restarts_once() {
    let Some(image) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let image = image.display().to_string();
    let (ok, stdout, stderr) = Sim::new().run(&[
        "--simulate",
        "up",
        "--vm",
        "frigate",
        "--restart",
        "--firmware",
        &image,
    ]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("10783 bytes"), "{stderr}");
    assert!(
        stderr.contains("2-4"),
        "ready at the SuperSpeed path: {stderr}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("up: firmware uploaded, Coral ready at 2-4"),
        "{stdout}"
    );
}

#[test]
fn simulated_init_works_without_any_firmware_installed() {
    let (ok, stdout, stderr) = Sim::new().run(&["--simulate", "init"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("Coral ready at 2-4"), "{stdout}");
    assert!(
        stderr.contains("coral firmware fetch"),
        "says what a real run needs: {stderr}"
    );
}

#[test]
fn simulated_wrong_firmware_is_refused_before_any_usb_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.bin");
    std::fs::write(&bad, vec![0x55u8; 10_783]).unwrap();
    let out = Sim::new()
        .coral()
        .args(["--simulate", "init", "--firmware"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("coral: ")).count(),
        1
    );
    assert!(stderr.contains("--allow-unknown-firmware"), "{stderr}");
}

#[test]
fn simulated_status_json_follows_the_schema() {
    let out = Sim::new()
        .coral()
        .args(["--simulate", "status", "--json"])
        .output()
        .unwrap();
    assert_succeeded(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["schema"], 1);
    let corals = json["corals"].as_array().expect("corals array");
    assert_eq!(corals.len(), 1);
    assert_eq!(corals[0]["path"], "2-4");
    assert_eq!(corals[0]["usb_state"], "ready");
}

#[test]
fn simulated_attach_dry_run_prints_the_commands_and_changes_nothing() {
    let out = Sim::new()
        .coral()
        .args([
            "--simulate",
            "--dry-run",
            "attach",
            "--vm",
            "frigate",
            "--restart",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_succeeded(&out);
    for expected in [
        "xe pusb-param-set",
        "xe vusb-create",
        "xe vm-shutdown",
        "xe vm-start",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from: {stdout}"
        );
    }
}

#[test]
fn simulated_unknown_vm_is_a_vm_error_naming_it() {
    let out = Sim::new()
        .coral()
        .args(["--simulate", "attach", "--vm", "frigate; reboot"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'frigate; reboot'") && stderr.contains("xe vm-list"),
        "{stderr}"
    );
}

#[test]
fn simulated_up_status_detach_tell_one_story() {
    let sim = Sim::new();
    let (ok, stdout, stderr) = sim.run(&["--simulate", "up", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("firmware uploaded"), "{stdout}");
    // The next run sees the Coral ready and its VUSB pending a restart.
    let (ok, stdout, stderr) = sim.run(&["--simulate", "status", "--json"]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["corals"][0]["usb_state"], "ready", "{stdout}");
    assert!(
        stdout.contains("frigate"),
        "status shows the VUSB made by up: {stdout}"
    );
    let (ok, stdout, stderr) = sim.run(&["--simulate", "detach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("removed VUSB"), "{stdout}");
    let (_, stdout, _) = sim.run(&["--simulate", "status"]);
    assert!(stdout.contains("VUSB: none"), "{stdout}");
    // A second up needs no firmware: the Coral stayed ready.
    let (ok, stdout, stderr) = sim.run(&["--simulate", "up", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("firmware uploaded"), "{stdout}");
    // Starting over is deleting the state file.
    std::fs::remove_file(sim.state()).unwrap();
    let (_, stdout, _) = sim.run(&["--simulate", "up", "--vm", "frigate"]);
    assert!(stdout.contains("firmware uploaded"), "{stdout}");
}

#[test]
fn simulate_and_dry_run_never_write_outside_the_simulation() {
    let sim = Sim::new();
    let target = tempfile::tempdir().unwrap();
    let image = target.path().join("image.bin");
    std::fs::write(&image, vec![0x42u8; 1000]).unwrap();
    let dir = target.path().join("firmware-dir");
    let root = target.path().join("root");
    for flag in ["--simulate", "--dry-run"] {
        let out = sim
            .coral()
            .args([
                flag,
                "firmware",
                "install",
                "--allow-unknown-firmware",
                "--dir",
            ])
            .arg(&dir)
            .arg(&image)
            .output()
            .unwrap();
        assert_succeeded(&out);
        assert!(String::from_utf8_lossy(&out.stdout).contains("would install"));
        assert!(
            !dir.exists(),
            "{flag} firmware install wrote {}",
            dir.display()
        );
        let out = sim
            .coral()
            .args([flag, "firmware", "fetch", "--dir"])
            .arg(&dir)
            .env("CORAL_FIRMWARE_URL_BASE", "file:///nonexistent")
            .output()
            .unwrap();
        assert_succeeded(&out);
        assert!(
            !dir.exists(),
            "{flag} firmware fetch wrote {}",
            dir.display()
        );
    }
    // --dry-run service install: says what it would write, writes nothing.
    let out = sim
        .coral()
        .args([
            "--simulate",
            "--dry-run",
            "service",
            "install",
            "--vm",
            "frigate",
            "--root",
        ])
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_succeeded(&out);
    assert!(
        stdout.contains("would write") && stdout.contains("ExecStart="),
        "{stdout}"
    );
    assert!(
        stdout.contains("would run: systemctl enable coral-up.service"),
        "{stdout}"
    );
    assert!(!root.exists());
    assert!(!sim
        .state()
        .with_extension("root")
        .join("etc/coral")
        .exists());
    // --simulate service install: only the simulated host's own root, never --root or /etc.
    let (ok, stdout, stderr) = sim.run(&[
        "--simulate",
        "service",
        "install",
        "--vm",
        "frigate",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let sim_root = sim.state().with_extension("root");
    assert!(stdout.contains(&sim_root.display().to_string()), "{stdout}");
    assert!(sim_root
        .join("etc/systemd/system/coral-up.service")
        .exists());
    assert!(!root.exists());
}

#[test]
fn simulated_boot_service_recovers_every_entry_and_doctor_passes() {
    let sim = Sim::new();
    let (ok, stdout, _) = sim.run(&["--simulate", "doctor"]);
    assert!(!ok, "no entry, no service: {stdout}");
    assert!(
        stdout.contains("FAIL  config") && stdout.contains("FAIL  service"),
        "{stdout}"
    );
    let (ok, _, stderr) = sim.run(&["--simulate", "service", "install", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = sim.run(&["--simulate", "up"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("VM 'frigate'") && stdout.contains("firmware uploaded"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = sim.run(&["--simulate", "doctor", "--json"]);
    assert!(ok, "{stdout}\n{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["passed"], true);
    let names: Vec<&str> = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for expected in [
        "binary",
        "firmware",
        "config",
        "coral 2-4",
        "usb-policy",
        "xapi",
        "vm frigate",
        "auto-start frigate",
        "backups",
        "service",
        "lock",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
}

#[test]
fn status_shows_each_mapping_with_the_watchers_last_action_and_the_pause_of_detach() {
    let sim = Sim::new();
    for args in [
        &["--simulate", "service", "install", "--vm", "frigate"][..],
        &["--simulate", "watch"][..],
    ] {
        let (ok, _, stderr) = sim.run(args);
        assert!(ok, "{args:?}: {stderr}");
    }
    let (ok, stdout, stderr) = sim.run(&["--simulate", "status", "--json"]);
    assert!(ok, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mapping = &status["mappings"][0];
    assert_eq!(mapping["vm_name"], "frigate", "{status:#}");
    assert_eq!(mapping["paused"], false);
    assert_eq!(mapping["last_action_ok"], true);
    assert!(mapping["last_action_at"].as_u64().unwrap() > 0);
    assert!(
        mapping["last_action"]
            .as_str()
            .unwrap()
            .contains("pending restart"),
        "the simulated brownout left the running VM waiting for its next start: {mapping}"
    );

    let (ok, _, stderr) = sim.run(&["--simulate", "detach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let (_, table, _) = sim.run(&["--simulate", "status"]);
    assert!(
        table.contains("Mapping the only Coral -> VM frigate (")
            && table.contains("[paused by a deliberate detach]"),
        "{table}"
    );
    // The watcher leaves a paused mapping alone (the simulated brownout
    // leaves the Coral in its boot loader), and `up --vm` resumes it.
    let (_, _, stderr) = sim.run(&["--simulate", "watch"]);
    assert!(stderr.contains("paused by a deliberate detach"), "{stderr}");
    let (ok, stdout, stderr) = sim.run(&["--simulate", "status", "--json"]);
    assert!(ok, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        status["corals"][0]["usb_state"], "uninitialized",
        "left in its boot loader: {status:#}"
    );
    let (ok, _, stderr) = sim.run(&["--simulate", "up", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let (_, stdout, _) = sim.run(&["--simulate", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["mappings"][0]["paused"], false, "{status:#}");
}

#[test]
fn status_json_gives_the_vms_power_state_as_xapi_names_it() {
    let sim = Sim::new();
    let (ok, stdout, stderr) = sim.run(&["--simulate", "up", "--vm", "frigate", "--restart"]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = sim.run(&["--simulate", "status", "--json"]);
    assert!(ok, "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let coral = &json["corals"][0];
    assert_eq!(coral["vm_name"], "frigate", "{json:#}");
    assert_eq!(coral["vm_power_state"], "running", "{json:#}");
    assert_eq!(coral["attached"], true, "{json:#}");
}

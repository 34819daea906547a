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

    /// A host whose Coral already had its firmware (`--simulate init`).
    fn ready() -> Self {
        let sim = Sim::new();
        let (ok, _, stderr) = sim.run(&["--simulate", "init"]);
        assert!(ok, "{stderr}");
        sim
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
        cmd.envs(support::isolated_env())
            .env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir")
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
    // A fresh simulation starts from the power loss, whatever the command.
    assert_eq!(corals[0]["path"], "1-4");
    assert_eq!(corals[0]["usb_state"], "uninitialized");
}

#[test]
fn simulated_attach_dry_run_prints_the_commands_and_changes_nothing() {
    // The Coral ready and listed by XAPI, its VUSB gone: what attach redoes.
    let sim = Sim::new();
    for args in [
        &["--simulate", "up", "--vm", "frigate"][..],
        &["--simulate", "detach", "--vm", "frigate"][..],
    ] {
        let (ok, _, stderr) = sim.run(args);
        assert!(ok, "{args:?}: {stderr}");
    }
    let before = std::fs::read(sim.state()).unwrap();
    let out = sim
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
    assert_eq!(
        std::fs::read(sim.state()).unwrap(),
        before,
        "the world is unchanged"
    );
    for expected in ["xe vusb-create", "xe vm-shutdown", "xe vm-start"] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from: {stdout}"
        );
    }
}

#[test]
fn simulated_unknown_vm_is_a_vm_error_naming_it() {
    for sim in [Sim::new(), Sim::ready()] {
        for command in ["up", "attach"] {
            let out = sim
                .coral()
                .args(["--simulate", command, "--vm", "frigate; reboot"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if command == "attach" && stderr.contains("not initialized") {
                continue; // attach needs a ready Coral first
            }
            assert_eq!(out.status.code(), Some(8), "{stderr}");
            let error = stderr.lines().last().unwrap_or_default();
            // The simulation has no `xe`: the hint names its VMs.
            assert!(
                error.contains("'frigate; reboot'")
                    && error.contains("the simulated pool has VM 'frigate'")
                    && !error.contains("xe vm-list"),
                "{stderr}"
            );
        }
    }
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
        table.contains("Mapping the only Coral -> VM 'frigate' (")
            && table.contains("[paused by coral detach]"),
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

/// Every file under `dir` with its contents (what a run may have written).
fn listing(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.push((path.clone(), Vec::new()));
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_first_command_starts_from_the_power_loss() {
    for args in [
        &["--simulate", "status"][..],
        &["--simulate", "attach", "--vm", "frigate"][..],
        &["--simulate", "detach", "--vm", "frigate"][..],
        &["--simulate", "init"][..],
        &["--simulate", "up", "--vm", "frigate"][..],
        &["--simulate", "doctor"][..],
    ] {
        let (_, _, stderr) = Sim::new().run(args);
        assert!(
            stderr.contains("simulated host (virtual time): uninitialized Coral at 1-4;"),
            "{args:?}: {stderr}"
        );
    }
}

/// The lines a run printed, without log prefixes.
fn messages(stdout: &str, stderr: &str) -> Vec<String> {
    (stdout.lines().chain(stderr.lines()))
        .map(|l| l.split_once("] ").map_or(l, |(_, m)| m).to_string())
        .collect()
}

#[test]
fn a_dry_run_says_what_it_would_do_and_never_that_it_did() {
    // From the power loss, and with the Coral ready but no longer attached.
    let fresh = Sim::new();
    let ready = Sim::new();
    for args in [
        &["--simulate", "up", "--vm", "frigate"][..],
        &["--simulate", "detach", "--vm", "frigate"][..],
    ] {
        assert!(ready.run(args).0, "{args:?}");
    }
    for (sim, story) in [(&fresh, "power loss"), (&ready, "ready, detached")] {
        let args = [
            "--simulate",
            "--dry-run",
            "up",
            "--vm",
            "frigate",
            "--restart",
        ];
        let (ok, stdout, stderr) = sim.run(&args);
        assert!(ok, "{story}: {stderr}");
        let summary = stdout.lines().last().unwrap_or_default();
        assert!(summary.starts_with("up: would "), "{story}: {stdout}");
        assert!(!summary.contains("passed through to"), "{story}: {summary}");
        for line in messages(&stdout, &stderr) {
            // What the run found is said as found; what it would change, as would.
            let observation = line.starts_with("simulated host")
                || line.starts_with("simulation: no firmware configured")
                || line.starts_with("Coral at 2-4 is ready")
                || line.starts_with("up: would ");
            assert!(
                observation || line.starts_with("would "),
                "{story}: a line not saying `would`: {line:?}\n{stdout}{stderr}"
            );
        }
        if story == "ready, detached" {
            // And a dry detach of what a real up left attached.
            let attached = Sim::new();
            assert!(
                attached
                    .run(&["--simulate", "up", "--vm", "frigate", "--restart"])
                    .0
            );
            let (ok, stdout, stderr) =
                attached.run(&["--simulate", "--dry-run", "detach", "--vm", "frigate"]);
            assert!(ok, "{stderr}");
            for line in messages(&stdout, &stderr) {
                assert!(
                    line.starts_with("would ") || line.starts_with("simulated host"),
                    "detach: {line:?}\n{stdout}{stderr}"
                );
            }
            assert!(summary.contains("would restart the VM once"), "{summary}");
        }
    }
}

#[test]
fn dry_runs_and_reads_write_nothing_at_all() {
    let sim = Sim::new();
    let reads: &[&[&str]] = &[
        &["--simulate", "status"],
        &["--simulate", "status", "--json"],
        &["--simulate", "doctor"],
        &["--simulate", "firmware", "show"],
        &["--simulate", "service", "show"],
        &[
            "--simulate",
            "--dry-run",
            "up",
            "--vm",
            "frigate",
            "--restart",
        ],
        &["--simulate", "--dry-run", "init"],
        &["--simulate", "--dry-run", "attach", "--vm", "frigate"],
        &["--simulate", "--dry-run", "detach", "--vm", "frigate"],
        &["--simulate", "--dry-run", "watch", "--vm", "frigate"],
        &[
            "--simulate",
            "--dry-run",
            "service",
            "install",
            "--vm",
            "frigate",
        ],
        &["--simulate", "--dry-run", "service", "uninstall"],
    ];
    // A fresh world (nothing in the directory), then one with a history.
    for setup in [
        &[][..],
        &[
            &["--simulate", "service", "install", "--vm", "frigate"][..],
            &["--simulate", "up"][..],
        ][..],
    ] {
        for args in setup {
            let (ok, _, stderr) = sim.run(args);
            assert!(ok, "{args:?}: {stderr}");
        }
        let before = listing(sim.dir.path());
        for args in reads {
            sim.run(args);
            assert_eq!(
                listing(sim.dir.path()),
                before,
                "{args:?} wrote into the simulation's directory"
            );
        }
    }
}

#[test]
fn simulated_firmware_show_reports_the_stand_in_and_where_a_real_image_goes() {
    let (ok, stdout, stderr) = Sim::new().run(&["--simulate", "firmware", "show"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("from:   simulation stand-in"), "{stdout}");
    assert!(stdout.contains("size:   10783 bytes"), "{stdout}");
    assert!(
        stderr.contains("into /nonexistent-coral-test-dir"),
        "the hint names the directory: {stderr}"
    );
}

#[test]
fn simulated_watch_shows_virtual_times_and_warns_of_the_stand_in_once() {
    let (ok, _, stderr) = Sim::new().run(&["--simulate", "watch", "--vm", "frigate", "--restart"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stderr.matches("recovering VM 'frigate'").count(),
        2,
        "the power loss and the brownout: {stderr}"
    );
    assert_eq!(
        stderr.matches("no firmware configured").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("at 30.0 s of virtual time: the Coral browns out"),
        "{stderr}"
    );
    assert!(
        stderr.contains("at 120.0 s of virtual time: ending the watch"),
        "{stderr}"
    );
}

#[test]
fn simulated_service_install_names_the_systemctl_commands_of_a_real_host() {
    let sim = Sim::new();
    let (ok, stdout, stderr) = sim.run(&["--simulate", "service", "install", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    for command in [
        "systemctl daemon-reload",
        "systemctl enable coral-up.service",
        "systemctl enable coral-watch.service",
        "systemctl reload-or-restart coral-watch.service",
    ] {
        assert!(
            stdout.contains(&format!("would run on a real host: {command}")),
            "{command}: {stdout}"
        );
    }
    let root = sim.state().with_extension("root");
    let link = root.join("etc/systemd/system/multi-user.target.wants/coral-watch.service");
    assert!(
        link.symlink_metadata().is_ok(),
        "enabled in the simulated root"
    );
}

#[test]
fn detach_and_status_name_the_vm_one_way() {
    let sim = Sim::new();
    assert!(sim.run(&["--simulate", "up", "--vm", "frigate"]).0);
    let (_, table, _) = sim.run(&["--simulate", "status"]);
    assert!(table.contains("-> VM 'frigate' ("), "{table}");
    let (ok, stdout, stderr) = sim.run(&["--simulate", "detach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("removed VUSB "))
        .unwrap_or_default();
    let rest = &line["removed VUSB ".len().min(line.len())..];
    assert!(
        rest.len() > 9 && rest.as_bytes()[8] == b':' && rest.contains("VM 'frigate'"),
        "{stdout}{stderr}"
    );
    for line in messages(&stdout, &stderr) {
        assert!(!line.contains("VM frigate"), "unquoted: {line}");
    }
}

#[test]
fn a_dry_run_watch_says_what_a_recovery_would_do() {
    let (ok, _, stderr) = Sim::new().run(&["--simulate", "--dry-run", "watch", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("recovering"), "{stderr}");
    assert!(stderr.contains("; would recover VM 'frigate'"), "{stderr}");
    assert!(
        stderr.contains("watch: VM 'frigate': up: would upload the firmware"),
        "{stderr}"
    );
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

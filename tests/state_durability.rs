//! Durable state and no ghosts (issue 17.5), through the built binary on
//! the `--simulate` host: a mapping state file that cannot be parsed is
//! kept aside, never silently overwritten, and `status` and `doctor` say its
//! pauses are lost while the boot path still works from the config; records
//! of VMs XAPI no longer has are neither shown nor kept.

use assert_cmd::Command;
use serde_json::Value;
use std::path::PathBuf;
mod support;

/// A simulated host of its own (state file in a fresh directory).
struct Sim {
    dir: tempfile::TempDir,
}

impl Sim {
    fn new() -> Self {
        Sim {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The simulated host's mapping state file.
    fn mappings(&self) -> PathBuf {
        self.dir.path().join("sim.root/var/lib/coral/mappings.json")
    }

    /// `coral ARGS`: (succeeded, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::cargo_bin("coral").unwrap();
        for var in [
            "CORAL_FIRMWARE",
            "CORAL_XE",
            "CORAL_INVENTORY",
            "CORAL_CONFIG",
            "CORAL_USB_POLICY",
            "JOURNAL_STREAM",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd
            .envs(support::isolated_env())
            .env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir")
            .env("CORAL_SIM_STATE", self.dir.path().join("sim.json"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The doctor's verdict on the state file.
    fn doctor_state_verdict(&self) -> (bool, String) {
        let (_, stdout, stderr) = self.run(&["--simulate", "doctor", "--json"]);
        let report: Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
        let state = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "state")
            .unwrap_or_else(|| panic!("no state check: {stdout}"))
            .clone();
        (
            report["passed"].as_bool().unwrap(),
            state["verdict"].as_str().unwrap().to_string(),
        )
    }

    /// Unreadable state files kept aside.
    fn kept_aside(&self) -> Vec<PathBuf> {
        let dir = self.mappings().parent().unwrap().to_path_buf();
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("mappings.json.unreadable-"))
            .collect()
    }
}

#[test]
fn a_truncated_state_file_is_kept_aside_and_its_lost_pause_is_reported() {
    let sim = Sim::new();
    let (ok, _, stderr) = sim.run(&["--simulate", "service", "install", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    // The simulation starts from the power loss: the Coral needs its firmware first.
    let (ok, _, stderr) = sim.run(&["--simulate", "init"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = sim.run(&["--simulate", "detach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let whole = std::fs::read(sim.mappings()).unwrap();
    assert!(String::from_utf8_lossy(&whole).contains("\"paused\": true"));
    // A disk error: the file is cut in half.
    let truncated = &whole[..whole.len() / 2];
    std::fs::write(sim.mappings(), truncated).unwrap();

    // status says the pause is lost (and exits 0: the rest of the status stands).
    let (ok, stdout, stderr) = sim.run(&["--simulate", "status"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("State: ") && stdout.contains("pauses recorded there are lost"),
        "{stdout}"
    );
    assert!(
        stderr.contains("[ERROR]"),
        "an error-priority line: {stderr}"
    );
    assert_eq!(sim.doctor_state_verdict(), (false, "fail".to_string()));

    // The boot path still works from the config, and keeps the file aside.
    let (ok, stdout, stderr) = sim.run(&["--simulate", "up"]);
    assert!(ok, "up works from the config: {stdout}{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.contains("[ERROR]") && l.contains("kept aside as"))
        .unwrap_or_else(|| panic!("no error line about the kept file: {stderr}"));
    assert!(error.contains("pauses recorded there are lost"), "{error}");
    let aside = sim.kept_aside();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).unwrap(),
        truncated,
        "kept as it was"
    );

    // It stays reported until the admin has redone the pauses and deleted it.
    let (_, stdout, _) = sim.run(&["--simulate", "status"]);
    assert!(stdout.contains(&aside[0].display().to_string()), "{stdout}");
    assert!(stdout.contains("coral detach --vm VM"), "{stdout}");
    assert_eq!(sim.doctor_state_verdict(), (false, "fail".to_string()));
    std::fs::remove_file(&aside[0]).unwrap();
    assert_eq!(sim.doctor_state_verdict().1, "ok");
}

#[test]
fn status_shows_no_ghosts_and_forgets_them() {
    let sim = Sim::new();
    let (ok, _, stderr) = sim.run(&["--simulate", "init"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = sim.run(&["--simulate", "detach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let mut states: Value =
        serde_json::from_slice(&std::fs::read(sim.mappings()).unwrap()).unwrap();
    let frigate = states["mappings"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let ghost = "0badc0de-0000-4000-8000-00000000dead";
    states["mappings"][ghost] = serde_json::json!({"vm_name": "gone", "paused": true});
    std::fs::write(sim.mappings(), serde_json::to_vec(&states).unwrap()).unwrap();

    let (ok, stdout, stderr) = sim.run(&["--simulate", "status", "--json"]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let shown: Vec<&str> = report["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["vm_uuid"].as_str().unwrap())
        .collect();
    assert_eq!(shown, vec![frigate.as_str()], "{stdout}");
    let kept: Value = serde_json::from_slice(&std::fs::read(sim.mappings()).unwrap()).unwrap();
    assert!(kept["mappings"].get(ghost).is_none(), "pruned: {kept}");
    assert_eq!(kept["mappings"][&frigate]["paused"], true, "{kept}");
}

#[test]
fn an_unfinished_restart_is_shown_warned_and_finished_by_the_next_attach() {
    let sim = Sim::new();
    let (ok, _, stderr) = sim.run(&["--simulate", "init"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = sim.run(&["--simulate", "attach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = sim.run(&["--simulate", "status", "--json"]);
    assert!(ok, "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let frigate = report["corals"][0]["vm_uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("init passes the Coral to frigate: {stdout}"))
        .to_string();
    // ... and halted by it, killed before its `xe vm-start`.
    let world = sim.dir.path().join("sim.json");
    let mut pool: Value = serde_json::from_slice(&std::fs::read(&world).unwrap()).unwrap();
    pool["pool"]["vms"][0]["running"] = Value::Bool(false);
    std::fs::write(&world, serde_json::to_vec(&pool).unwrap()).unwrap();
    // A run killed mid-restart left its intent (written as coral writes it).
    let states = serde_json::json!({"mappings": {&frigate: {
        "vm_name": "frigate",
        "restart_intent": {"why": "clean shutdown to restart it with the Coral", "at": 1}
    }}});
    std::fs::write(sim.mappings(), serde_json::to_vec(&states).unwrap()).unwrap();

    let (_, stdout, _) = sim.run(&["--simulate", "status", "--json"]);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        report["mappings"][0]["unfinished_restart"]["why"],
        "clean shutdown to restart it with the Coral",
        "{stdout}"
    );
    assert_eq!(report["schema"], 1);
    let (_, stdout, _) = sim.run(&["--simulate", "status"]);
    assert!(stdout.contains("UNFINISHED restart"), "{stdout}");
    assert_eq!(sim.doctor_state_verdict().1, "warn");

    // The next attach (no --start) finishes the restart: frigate runs.
    let (ok, _, stderr) = sim.run(&["--simulate", "attach", "--vm", "frigate"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("a previous coral run left unfinished; coral is finishing it"),
        "{stderr}"
    );
    let (_, stdout, _) = sim.run(&["--simulate", "status", "--json"]);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["mappings"][0]["unfinished_restart"], Value::Null);
    assert_eq!(report["corals"][0]["vm_power_state"], "running", "{stdout}");
    assert_eq!(
        report["corals"][0]["attached"], true,
        "with its Coral: {stdout}"
    );
    assert_eq!(sim.doctor_state_verdict().1, "ok");
}

#[test]
fn the_boot_path_finishes_a_restart_a_killed_run_left() {
    let sim = Sim::new();
    for args in [
        &["--simulate", "init"][..],
        &["--simulate", "service", "install", "--vm", "frigate"],
    ] {
        let (ok, _, stderr) = sim.run(args);
        assert!(ok, "{stderr}");
    }
    let world = sim.dir.path().join("sim.json");
    let mut pool: Value = serde_json::from_slice(&std::fs::read(&world).unwrap()).unwrap();
    let frigate = pool["pool"]["vms"][0]["uuid"].as_str().unwrap().to_string();
    pool["pool"]["vms"][0]["running"] = Value::Bool(false);
    std::fs::write(&world, serde_json::to_vec(&pool).unwrap()).unwrap();
    let states = serde_json::json!({"mappings": {&frigate: {
        "restart_intent": {"why": "VM 'frigate': clean shutdown", "at": 1}
    }}});
    std::fs::create_dir_all(sim.mappings().parent().unwrap()).unwrap();
    std::fs::write(sim.mappings(), serde_json::to_vec(&states).unwrap()).unwrap();

    // The entry has no `start`: only the recorded intent starts frigate.
    let (ok, _, stderr) = sim.run(&["--simulate", "up"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("left unfinished"), "{stderr}");
    let (_, stdout, _) = sim.run(&["--simulate", "status", "--json"]);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["corals"][0]["vm_power_state"], "running", "{stdout}");
    assert_eq!(report["corals"][0]["attached"], true, "{stdout}");
    assert_eq!(report["mappings"][0]["unfinished_restart"], Value::Null);

    // A VM the user halts, with no intent, stays halted through `coral up`.
    let mut pool: Value = serde_json::from_slice(&std::fs::read(&world).unwrap()).unwrap();
    pool["pool"]["vms"][0]["running"] = Value::Bool(false);
    std::fs::write(&world, serde_json::to_vec(&pool).unwrap()).unwrap();
    let (ok, _, stderr) = sim.run(&["--simulate", "up"]);
    assert!(ok, "{stderr}");
    let (_, stdout, _) = sim.run(&["--simulate", "status", "--json"]);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["corals"][0]["vm_power_state"], "halted", "{stdout}");
}

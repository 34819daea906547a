//! The `--simulate` front door: what a newcomer sees from the built binary.

use assert_cmd::Command;
mod support;

use support::shared_firmware;

fn coral() -> Command {
    let mut cmd = Command::cargo_bin("coral").expect("coral binary");
    // Keep the real host's settings out of the simulation.
    for var in [
        "CORAL_FIRMWARE",
        "CORAL_FIRMWARE_DIR",
        "CORAL_XE",
        "CORAL_INVENTORY",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir");
    cmd
}

#[test]
fn simulated_up_with_restart_recovers_the_coral_and_restarts_once() {
    let Some(image) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let out = coral()
        .args([
            "--simulate",
            "up",
            "--vm",
            "frigate",
            "--restart",
            "--firmware",
        ])
        .arg(&image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
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
    let out = coral().args(["--simulate", "init"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
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
    let out = coral()
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
    let out = coral()
        .args(["--simulate", "status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["schema"], 1);
    let corals = json["corals"].as_array().expect("corals array");
    assert_eq!(corals.len(), 1);
    assert_eq!(corals[0]["path"], "2-4");
    assert_eq!(corals[0]["usb_state"], "ready");
}

#[test]
fn simulated_attach_dry_run_prints_the_commands_and_changes_nothing() {
    let out = coral()
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = coral()
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

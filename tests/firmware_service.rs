//! Firmware manifest, loading order, install and fetch; the boot unit;
//! the lock between two processes — through the built binary.

use assert_cmd::Command;
use coral::firmware::{self, FirmwareChoice, FirmwareSource};
mod support;

use std::path::Path;
use support::{assert_succeeded, shared_firmware};

fn coral() -> Command {
    let mut cmd = Command::cargo_bin("coral").unwrap();
    cmd.envs(support::isolated_env())
        .env_remove("CORAL_FIRMWARE")
        .env_remove("CORAL_FIRMWARE_DIR");
    cmd
}

/// `coral service VERB --root ROOT`, the config file taken from that root.
fn service_in_root(verb: &str, root: &Path) -> std::process::Output {
    coral()
        .env_remove("CORAL_CONFIG")
        .args(["service", verb, "--root"])
        .arg(root)
        .output()
        .unwrap()
}

#[test]
fn the_real_images_pass_the_manifest_and_a_modified_one_does_not() {
    for entry in firmware::manifest() {
        let Some(path) = shared_firmware(&entry.name) else {
            return;
        };
        let choice = FirmwareChoice {
            explicit: Some(path.clone()),
            allow_unknown: false,
            install_dir: "/nonexistent".into(),
        };
        let image = firmware::load(&choice).unwrap();
        assert_eq!(image.known_name.as_deref(), Some(entry.name.as_str()));
        assert_eq!(image.bytes.len(), entry.size);
        assert!(entry
            .url
            .contains("e35aed18fea2e2d25d98352e5a5bd357c170bd4d"));

        let dir = tempfile::tempdir().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        let modified = dir.path().join(&entry.name);
        std::fs::write(&modified, &bytes).unwrap();
        let choice = FirmwareChoice {
            explicit: Some(modified),
            ..choice
        };
        let err = firmware::load(&choice).unwrap_err();
        assert_eq!(coral::error::exit_code_of(&err), 4);
        let allowed = FirmwareChoice {
            allow_unknown: true,
            ..choice
        };
        assert!(firmware::load(&allowed).unwrap().known_name.is_none());
    }
}

#[test]
fn the_image_comes_from_flag_then_env_then_installed_copy() {
    let Some(single) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let Some(multi) = shared_firmware("apex_latest_multi_ep.bin") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = coral()
        .args(["firmware", "install"])
        .arg(&single)
        .env("CORAL_FIRMWARE_DIR", dir.path())
        .output()
        .unwrap();
    assert_succeeded(&out);
    assert_eq!(
        std::fs::read(dir.path().join("apex_latest_single_ep.bin")).unwrap(),
        std::fs::read(&single).unwrap()
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() == 1,
        "no temporary file left"
    );

    let show = |extra: &[&str], env: Option<&Path>| {
        let mut cmd = coral();
        cmd.args(["firmware", "show"])
            .args(extra)
            .env("CORAL_FIRMWARE_DIR", dir.path());
        if let Some(e) = env {
            cmd.env("CORAL_FIRMWARE", e);
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    assert!(
        show(&[], None).contains("installed copy"),
        "{}",
        show(&[], None)
    );
    assert!(show(&[], Some(&multi)).contains("$CORAL_FIRMWARE"));
    let flag = show(&["--firmware", single.to_str().unwrap()], Some(&multi));
    assert!(
        flag.contains("--firmware") && flag.contains("3b07311b174b81fd"),
        "{flag}"
    );
    let _ = FirmwareSource::Embedded;
}

#[test]
fn no_image_anywhere_says_how_to_get_one() {
    let out = coral()
        .args(["firmware", "show"])
        .env("CORAL_FIRMWARE_DIR", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("coral firmware fetch") && err.contains("coral firmware install FILE"),
        "{err}"
    );
}

#[test]
fn fetch_verifies_and_leaves_nothing_half_written() {
    let Some(single) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let served = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let base = format!("file://{}", served.path().display());
    let fetch = || {
        coral()
            .args(["firmware", "fetch", "--dir"])
            .arg(target.path())
            .env("CORAL_FIRMWARE_URL_BASE", &base)
            .output()
            .unwrap()
    };

    // Missing upstream file: curl fails, nothing is left behind.
    let out = fetch();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 0);

    // A tampered download is refused, nothing installed.
    std::fs::write(
        served.path().join("apex_latest_single_ep.bin"),
        b"not firmware",
    )
    .unwrap();
    let out = fetch();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the pinned image"));
    assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 0);

    std::fs::copy(&single, served.path().join("apex_latest_single_ep.bin")).unwrap();
    let out = fetch();
    assert_succeeded(&out);
    assert_eq!(
        std::fs::read(target.path().join("apex_latest_single_ep.bin")).unwrap(),
        std::fs::read(&single).unwrap()
    );
    assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 1);
}

#[test]
fn service_install_show_uninstall_in_a_temporary_root() {
    use coral_testkit::xapi::{coral_ready_device, PowerState};
    let vm = "my \"cam\" vm $x 100%";
    let (world, host, vm_uuid) = support::pool(
        support::fast_config(),
        vm,
        PowerState::Halted,
        vec![coral_ready_device("2-4")],
    );
    let xapi = support::FakeXapi::new(world, &host);
    let root = tempfile::tempdir().unwrap();
    let out = coral()
        .envs(xapi.env())
        .env_remove("CORAL_CONFIG")
        .args(["service", "install", "--vm", vm, "--restart", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert_succeeded(&out);
    let unit =
        std::fs::read_to_string(root.path().join("etc/systemd/system/coral-up.service")).unwrap();
    for line in [
        "Type=oneshot",
        "RemainAfterExit=yes",
        "Wants=xapi-init-complete.target",
        "After=xapi-init-complete.target",
        "Before=xapi-domains.service",
        "WantedBy=multi-user.target",
        "TimeoutStartSec=240",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
    }
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart=/"))
        .expect("absolute ExecStart");
    assert!(exec.ends_with(" --lock-timeout 30 up"), "{exec}");
    let config = std::fs::read_to_string(root.path().join("etc/coral/coral.toml")).unwrap();
    assert!(
        config.contains(&format!("vm = \"{vm_uuid}\"")),
        "the VM by uuid: {config}"
    );
    assert!(
        config.contains(r#"vm_name = "my \"cam\" vm $x 100%""#),
        "{config}"
    );
    assert!(config.contains("restart = true"), "{config}");

    let shown = service_in_root("show", root.path());
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(unit.trim()), "{shown}");
    assert!(shown.contains("installed, as install writes it"), "{shown}");
    let out = service_in_root("uninstall", root.path());
    assert!(out.status.success());
    assert!(!root
        .path()
        .join("etc/systemd/system/coral-up.service")
        .exists());
    assert!(!root.path().join("etc/coral/coral.toml").exists());
}

#[test]
fn a_second_run_fails_fast_on_the_lock_with_no_wait() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("coral.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap();
    file.lock().unwrap();
    let attach_without_waiting = || {
        coral()
            .args(["--no-wait", "--lock-file"])
            .arg(&lock)
            .args(["attach", "--vm", "frigate"])
            .env("CORAL_XE", "/bin/false")
            .env("CORAL_INVENTORY", dir.path().join("inv"))
            .output()
            .unwrap()
    };
    let out = attach_without_waiting();
    // The inventory is read first (exit 7) — write one so the lock is what fails.
    assert_eq!(out.status.code(), Some(7));
    std::fs::write(dir.path().join("inv"), "INSTALLATION_UUID='h'\n").unwrap();
    let out = attach_without_waiting();
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("another coral run holds"));
}

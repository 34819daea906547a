//! `coral doctor` through the built binary: the fake `xe`, a temporary root,
//! a stand-in usb-policy.conf. Each check's verdict and fix; read-only.

use assert_cmd::Command;
use coral_testkit::e2e::assert_succeeded;
mod support;
use std::os::unix::fs::OpenOptionsExt;

use coral_testkit::xapi::{coral_ready_device, PowerState, World};
use serde_json::Value;
use std::path::Path;
use support::{fast_config, pool, FakeXapi};

const DEFAULT_POLICY: &str = "DENY: class=02 # comm\nDENY: class=0a\nALLOW: # rest\n";

struct Setup {
    xapi: FakeXapi,
    root: tempfile::TempDir,
    vm: String,
}

fn setup(edit: impl FnOnce(&mut World, &str)) -> Setup {
    let (mut world, host, vm) = pool(
        fast_config(),
        "frigate",
        PowerState::Halted,
        vec![coral_ready_device("2-4")],
    );
    edit(&mut world, &vm);
    let setup = Setup {
        xapi: FakeXapi::new(world, &host),
        root: tempfile::tempdir().unwrap(),
        vm,
    };
    std::fs::write(setup.xapi.dir().join("usb-policy.conf"), DEFAULT_POLICY).unwrap();
    let out = setup
        .coral()
        .args(["service", "install", "--vm", "frigate", "--root"])
        .arg(setup.root.path())
        .output()
        .unwrap();
    assert_succeeded(&out);
    setup
}

impl Setup {
    fn coral(&self) -> Command {
        let mut cmd = Command::cargo_bin("coral").unwrap();
        cmd.envs(support::isolated_env())
            .env_remove("CORAL_CONFIG")
            .env_remove("CORAL_FIRMWARE")
            .env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir")
            .env("CORAL_USB_POLICY", self.xapi.dir().join("usb-policy.conf"))
            .env("CORAL_LOCK", self.xapi.dir().join("coral.lock"))
            .envs(self.xapi.env());
        cmd
    }

    /// `coral doctor --json`: exit code and the checks by name.
    fn doctor(&self) -> (Option<i32>, Value) {
        let out = self
            .coral()
            .args(["doctor", "--json", "--root"])
            .arg(self.root.path())
            .output()
            .unwrap();
        let json: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), json)
    }
}

fn check<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {json:#}"))
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(tree(&path));
        } else {
            out.push((
                path.display().to_string(),
                std::fs::read(&path).unwrap_or_default(),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn auto_start_off_fails_with_the_commands_that_fix_it_and_nothing_changes() {
    let s = setup(|_, _| {});
    let before = tree(s.root.path());
    let calls_before = s.xapi.world().calls.len();
    let (code, json) = s.doctor();
    assert_ne!(code, Some(0));
    assert_eq!(json["passed"], false);
    let auto = check(&json, "auto-start frigate");
    assert_eq!(auto["verdict"], "fail", "{auto}");
    let fix = auto["fix"].as_str().unwrap();
    assert!(
        fix.contains(&format!(
            "xe vm-param-set uuid={} other-config:auto_poweron=true",
            s.vm
        )) && fix.contains("xe pool-param-set"),
        "{fix}"
    );
    assert_eq!(check(&json, "vm frigate")["verdict"], "ok");
    assert_eq!(check(&json, "service")["verdict"], "ok");
    assert_eq!(check(&json, "usb-policy")["verdict"], "ok");
    assert_eq!(check(&json, "lock")["verdict"], "ok");
    assert_eq!(check(&json, "backups")["verdict"], "warn");
    assert_eq!(check(&json, "xapi")["verdict"], "ok");
    // Read-only: no file changed, only reading xe commands.
    assert_eq!(tree(s.root.path()), before);
    let world = s.xapi.world();
    for call in &world.calls[calls_before..] {
        let command = call.args[0].as_str();
        assert!(
            command.ends_with("-list") || command.ends_with("-param-get"),
            "doctor ran {:?}",
            call.args
        );
    }
}

#[test]
fn with_auto_start_set_the_vm_checks_pass() {
    let s = setup(|world, vm| {
        world
            .vm_mut(vm)
            .unwrap()
            .other_config
            .insert("auto_poweron".into(), "true".into());
        world
            .pool
            .other_config
            .insert("auto_poweron".into(), "true".into());
    });
    let (_, json) = s.doctor();
    assert_eq!(
        check(&json, "auto-start frigate")["verdict"],
        "ok",
        "{json:#}"
    );
}

#[test]
fn a_policy_that_denies_the_coral_fails_with_the_rule_to_add() {
    let s = setup(|_, _| {});
    std::fs::write(
        s.xapi.dir().join("usb-policy.conf"),
        "DENY: class=ff # vendor specific\nALLOW:\n",
    )
    .unwrap();
    let (code, json) = s.doctor();
    assert_ne!(code, Some(0));
    let policy = check(&json, "usb-policy");
    assert_eq!(policy["verdict"], "fail", "{policy}");
    assert!(policy["fix"]
        .as_str()
        .unwrap()
        .contains("ALLOW: vid=18d1 pid=9302"));
}

#[test]
fn the_policy_is_checked_for_both_identities_and_the_denying_rule_is_named() {
    let s = setup(|_, _| {});
    let policy_file = s.xapi.dir().join("usb-policy.conf");
    // The first matching rule decides: the ALLOW after the DENY never applies.
    std::fs::write(
        &policy_file,
        "# local edits\nDENY: class=02\nDENY: vid=18d1 pid=9302 # someone's rule\nALLOW: class=ff\nALLOW:\n",
    )
    .unwrap();
    let (_, json) = s.doctor();
    let policy = check(&json, "usb-policy");
    assert_eq!(policy["verdict"], "fail", "{policy}");
    let detail = policy["detail"].as_str().unwrap();
    assert!(
        detail.contains("class ff/ff/ff") && detail.contains("line 3: `DENY: vid=18d1 pid=9302`"),
        "{detail}"
    );

    // The boot loader (class fe/01/02) denied by a subclass rule; the ready
    // Coral admitted.
    std::fs::write(&policy_file, "DENY: class=fe subclass=01 prot=02\nALLOW:\n").unwrap();
    let (_, json) = s.doctor();
    let policy = check(&json, "usb-policy");
    assert_eq!(policy["verdict"], "warn", "{policy}");
    let detail = policy["detail"].as_str().unwrap();
    assert!(
        detail.contains("fe/01/02")
            && detail.contains("line 1: `DENY: class=fe subclass=01 prot=02`"),
        "{detail}"
    );

    // No rule matches: denied, and said so.
    std::fs::write(&policy_file, "ALLOW: class=fe\n").unwrap();
    let (_, json) = s.doctor();
    let policy = check(&json, "usb-policy");
    assert_eq!(policy["verdict"], "fail", "{policy}");
    assert!(
        policy["detail"]
            .as_str()
            .unwrap()
            .contains("no rule matches it"),
        "{policy}"
    );

    // Both admitted.
    std::fs::write(&policy_file, DEFAULT_POLICY).unwrap();
    let (_, json) = s.doctor();
    let policy = check(&json, "usb-policy");
    assert_eq!(policy["verdict"], "ok", "{policy}");
    assert!(policy["detail"]
        .as_str()
        .unwrap()
        .contains("both identities"));
}

#[test]
fn an_ha_protected_vm_and_a_held_lock_fail() {
    let s = setup(|_, _| {});
    // HA protection set after install (install itself refuses such a VM).
    let mut state = coral_testkit::xapi::SimState::load(&s.xapi.state).unwrap();
    state.world.vm_mut(&s.vm).unwrap().ha_restart_priority = "restart".into();
    state.save(&s.xapi.state).unwrap();
    // Held by another run (a lock file as coral makes it: 0600).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(s.xapi.dir().join("coral.lock"))
        .unwrap();
    lock.lock().unwrap();
    let (code, json) = s.doctor();
    assert_ne!(code, Some(0));
    assert_eq!(check(&json, "vm frigate")["verdict"], "fail");
    assert!(check(&json, "vm frigate")["detail"]
        .as_str()
        .unwrap()
        .contains("HA"));
    assert_eq!(check(&json, "lock")["verdict"], "fail");
    assert!(check(&json, "lock")["detail"]
        .as_str()
        .unwrap()
        .contains("another coral run holds"));
    // Left 0644 (by an older coral): anyone could hold it.
    std::fs::set_permissions(
        s.xapi.dir().join("coral.lock"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    drop(lock);
    let (_, json) = s.doctor();
    assert_eq!(check(&json, "lock")["verdict"], "fail");
    assert!(check(&json, "lock")["detail"]
        .as_str()
        .unwrap()
        .contains("has mode 644"));
}

#[test]
fn a_missing_or_disabled_unit_fails_and_the_text_output_names_the_fix() {
    let s = setup(|_, _| {});
    std::fs::remove_file(
        s.root
            .path()
            .join("etc/systemd/system/multi-user.target.wants/coral-up.service"),
    )
    .unwrap();
    let out = s
        .coral()
        .args(["doctor", "--root"])
        .arg(s.root.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("FAIL  service")
            && stdout.contains("fix: systemctl enable coral-up.service"),
        "{stdout}"
    );
    assert!(
        stdout.lines().last().unwrap().starts_with("doctor: "),
        "{stdout}"
    );
}

/// `coral --simulate ARGS` on a simulated host of its own (state in `dir`).
fn simulated(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::cargo_bin("coral")
        .unwrap()
        .env_remove("CORAL_CONFIG")
        .env_remove("CORAL_FIRMWARE")
        .env_remove("CORAL_USB_POLICY")
        .env_remove("CORAL_XE")
        .env_remove("CORAL_INVENTORY")
        .env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir")
        .env("CORAL_SIM_STATE", dir.join("sim.json"))
        .arg("--simulate")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_entry_whose_port_has_no_coral_fails_with_the_replace_that_moves_it() {
    let dir = tempfile::tempdir().unwrap();
    let doctor = || {
        let (code, out, err) = simulated(dir.path(), &["doctor", "--json"]);
        let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {err}"));
        (code, json)
    };
    let install = |args: &[&str]| {
        let (code, out, err) = simulated(
            dir.path(),
            &[&["service", "install", "--vm", "frigate"][..], args].concat(),
        );
        assert_eq!(code, Some(0), "{out}{err}");
    };
    let vm = "daa66d13-0003-4003-8000-000000000003";
    // The simulated Coral is the boot loader at 1-4 (ready at 2-4); 3-1 is empty.
    install(&["--device", "3-1"]);
    let (code, json) = doctor();
    assert_ne!(code, Some(0));
    let stale = check(&json, "coral 3-1");
    assert_eq!(stale["verdict"], "fail", "{stale}");
    assert!(
        stale["detail"]
            .as_str()
            .unwrap()
            .contains("no Coral is at that port now"),
        "{stale}"
    );
    // The Coral on USB that no entry names is where it probably went.
    assert_eq!(
        stale["fix"].as_str().unwrap(),
        format!("if the Coral moved to 1-4: `coral service install --vm {vm} --device 1-4 --replace` (drops this entry); else plug it back into 3-1")
    );

    // Installed at the new port without --replace: a second entry; the old one still fails.
    install(&["--device", "2-4"]);
    let (_, json) = doctor();
    let stale = check(&json, "coral 3-1");
    assert_eq!(stale["verdict"], "fail", "{stale}");
    assert!(
        stale["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("--vm {vm} --device 2-4 --replace")),
        "{stale}"
    );

    // The fix it names: the entry moves, and nothing fails any more.
    install(&["--device", "2-4", "--replace"]);
    let (code, json) = doctor();
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "coral 3-1" && c["verdict"] != "fail"),
        "{json:#}"
    );
    assert_eq!((code, &json["passed"]), (Some(0), &Value::Bool(true)));
}

//! Local users cannot interfere (issue 17.6). These tests plant files as an
//! unprivileged user (`setpriv` to uid/gid 65534, nobody) and run coral as
//! root, as the boot service and the watcher run: they need root (CI runs
//! them as root; elsewhere they are skipped, and fail under `CI=true`).
//!
//! - The lock file is 0600: an unprivileged user cannot open it, so cannot
//!   hold the lock and block every run.
//! - A symlink planted at the lock path, at a temporary file's path, or as
//!   `--simulate`'s directory is refused or never followed: its target is
//!   untouched.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;

/// The unprivileged user the tests act as.
const NOBODY: u32 = 65534;

/// True when running as root; otherwise a skip (a failure under CI=true).
fn as_root() -> bool {
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        == 0;
    let setpriv = Command::new("setpriv").arg("--help").output().is_ok();
    if !root {
        support::skip("needs root, to act as an unprivileged user with setpriv");
    } else if !setpriv {
        support::skip("needs setpriv (util-linux)");
    }
    root && setpriv
}

/// `program args` run as nobody.
fn as_nobody(program: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            program,
        ])
        .args(args)
        .output()
        .unwrap()
}

/// A directory anyone may create files in, like /tmp (mode 1777).
fn shared_tmp() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

/// A file of root's the attacker would like coral to overwrite.
fn victim(dir: &Path) -> PathBuf {
    let path = dir.join("victim");
    std::fs::write(&path, b"precious\n").unwrap();
    path
}

/// The built coral, as root, with the host's settings kept out.
fn coral(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coral"));
    // Its own state directory; the simulation's paths are what is tested here.
    cmd.envs(support::isolated_env());
    for var in [
        "CORAL_FIRMWARE",
        "CORAL_XE",
        "CORAL_INVENTORY",
        "CORAL_CONFIG",
        "CORAL_LOCK",
        "CORAL_SIM_STATE",
        "XDG_RUNTIME_DIR",
        "JOURNAL_STREAM",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn an_unprivileged_user_cannot_hold_the_lock() {
    if !as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let lock = dir.path().join("coral.lock");
    // A run creates the lock file (init with no Coral: it takes the lock, then fails with exit 3).
    let out = coral(
        &[
            "--lock-file",
            lock.to_str().unwrap(),
            "--no-wait",
            "init",
            "--wait-device",
            "0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let mode = std::fs::metadata(&lock).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "lock file mode {mode:o}");

    // nobody cannot open it, so cannot hold it: flock(1) fails to open it.
    let held = as_nobody("flock", &["--nonblock", lock.to_str().unwrap(), "true"]);
    assert!(!held.status.success(), "nobody took the lock");
    assert!(
        text(&held.stderr).contains("Permission denied"),
        "{}",
        text(&held.stderr)
    );
}

#[test]
fn a_lock_file_left_loose_is_tightened_and_another_users_is_refused() {
    if !as_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("coral.lock");
    let args = [
        "--lock-file",
        lock.to_str().unwrap(),
        "--no-wait",
        "init",
        "--wait-device",
        "0",
    ];
    // Left 0644 by an older coral: tightened.
    std::fs::write(&lock, b"").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = coral(&args, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&lock).unwrap().mode() & 0o777, 0o600);
    // Another user's: refused in one line naming the file and the fix.
    std::os::unix::fs::chown(&lock, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = coral(&args, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(
        line.starts_with("coral: the lock file ")
            && line.contains(lock.to_str().unwrap())
            && line.contains("belongs to uid 65534")
            && line.contains("rm -r"),
        "{stderr}"
    );
}

#[test]
fn a_symlink_planted_at_the_lock_path_is_refused() {
    if !as_root() {
        return;
    }
    let tmp = shared_tmp();
    let safe = tempfile::tempdir().unwrap();
    let victim = victim(safe.path());
    let lock = tmp.path().join("coral.lock");
    let planted = as_nobody(
        "ln",
        &["-s", victim.to_str().unwrap(), lock.to_str().unwrap()],
    );
    assert!(planted.status.success(), "{}", text(&planted.stderr));

    let out = coral(
        &[
            "--lock-file",
            lock.to_str().unwrap(),
            "--no-wait",
            "init",
            "--wait-device",
            "0",
        ],
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is a symlink"), "{stderr}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious\n",
        "the target is untouched"
    );
}

#[test]
fn a_symlink_planted_at_a_temporary_path_is_never_written_through() {
    if !as_root() {
        return;
    }
    // The simulation's state in a shared directory (CORAL_SIM_STATE names it):
    // the attacker plants the temporary names a write used to take.
    let tmp = shared_tmp();
    let safe = tempfile::tempdir().unwrap();
    let victim = victim(safe.path());
    let state = tmp.path().join("sim.json");
    for name in ["sim.json.tmp", "sim.tmp", ".sim.json.tmp"] {
        let at = tmp.path().join(name);
        let planted = as_nobody(
            "ln",
            &["-s", victim.to_str().unwrap(), at.to_str().unwrap()],
        );
        assert!(planted.status.success(), "{}", text(&planted.stderr));
    }
    let out = coral(&["--simulate", "init"], &[("CORAL_SIM_STATE", &state)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious\n",
        "the target is untouched"
    );
    // The state was written, as a file of root's alone.
    let meta = std::fs::symlink_metadata(&state).unwrap();
    assert!(
        meta.is_file() && meta.uid() == 0 && meta.mode() & 0o077 == 0,
        "{meta:?}"
    );
}

#[test]
fn a_planted_simulation_directory_is_refused() {
    if !as_root() {
        return;
    }
    let tmp = shared_tmp();
    let sim_dir = tmp.path().join("coral-sim-0");
    let attackers = tmp.path().join("attackers");
    let setup = |args: &[&str]| {
        let out = as_nobody(args[0], &args[1..]);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    };
    let run = || coral(&["--simulate", "status"], &[("TMPDIR", tmp.path())]);
    setup(&["mkdir", attackers.to_str().unwrap()]);
    setup(&["chmod", "777", attackers.to_str().unwrap()]);

    // A symlink to a directory the attacker reads.
    setup(&[
        "ln",
        "-s",
        attackers.to_str().unwrap(),
        sim_dir.to_str().unwrap(),
    ]);
    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(
        line.contains(sim_dir.to_str().unwrap()) && line.contains("is a symlink"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&attackers).unwrap().count(),
        0,
        "nothing written there"
    );

    // A directory of the attacker's own.
    std::fs::remove_file(&sim_dir).unwrap();
    setup(&["mkdir", "-m", "700", sim_dir.to_str().unwrap()]);
    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
    assert_eq!(std::fs::read_dir(&sim_dir).unwrap().count(), 0);

    // root's own, but writable by others.
    std::fs::remove_dir(&sim_dir).unwrap();
    std::fs::create_dir(&sim_dir).unwrap();
    std::fs::set_permissions(&sim_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("writable by group or others"));

    // Absent: a read leaves it absent; a command that changes the simulated
    // world creates it private.
    std::fs::remove_dir(&sim_dir).unwrap();
    let out = run();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::symlink_metadata(&sim_dir).is_err(),
        "status wrote nothing"
    );
    let out = coral(&["--simulate", "init"], &[("TMPDIR", tmp.path())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta = std::fs::symlink_metadata(&sim_dir).unwrap();
    assert!(
        meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o777 == 0o700,
        "{meta:?}"
    );
}

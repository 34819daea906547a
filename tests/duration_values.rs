//! Every duration flag and config value goes through one range-checked
//! parser (issue 17.7): absurd values stop with exit 2 (flags) or a
//! line-numbered config error before any USB or `xe` call, never a panic.

use assert_cmd::Command;
use std::path::Path;

/// The binary with an `xe` that must never run and fresh state, lock and
/// config paths under `dir`.
fn coral(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coral"));
    cmd.env("CORAL_XE", dir.join("xe-must-not-run"))
        .env("CORAL_INVENTORY", dir.join("inventory"))
        .env("CORAL_LOCK", dir.join("coral.lock"))
        .env("CORAL_STATE_DIR", dir.join("state"))
        .env("CORAL_CONFIG", dir.join("coral.toml"))
        .env("CORAL_SIM_STATE", dir.join("sim.json"))
        .env("CORAL_FIRMWARE_DIR", dir.join("firmware"))
        .env_remove("JOURNAL_STREAM");
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn absurd_duration_flags_are_usage_errors_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[&[&str]] = &[
        &[
            "attach",
            "--vm",
            "x",
            "--xapi-timeout",
            "18446744073709549568",
        ],
        &["attach", "--vm", "x", "--xapi-timeout", "nan"],
        &["attach", "--vm", "x", "--xapi-timeout", "inf"],
        &["attach", "--vm", "x", "--xapi-timeout=-1"],
        &["attach", "--vm", "x", "--scan-timeout", "1e300"],
        &["up", "--vm", "x", "--wait-device", "nan"],
        &["up", "--vm", "x", "--timeout", "18446744073709549568"],
        &["init", "--wait-device=-5"],
        &["watch", "--vm", "x", "--xapi-check", "inf"],
        &["status", "--lock-timeout", "99999999999"],
    ];
    for args in cases {
        let out = coral(dir.path()).args(*args).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        // clap's usage error: its first line names the flag and the range.
        let flag = args.iter().rfind(|a| a.starts_with("--")).unwrap();
        let flag = flag.split('=').next().unwrap();
        let first = stderr.lines().next().unwrap_or("");
        assert!(first.contains(flag), "{args:?} names the flag: {stderr}");
        assert!(
            first.contains("at most 604800 (a week)"),
            "{args:?} says the range: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Nothing ran: no lock file, no state.
    assert!(!dir.path().join("coral.lock").exists());
    assert!(!dir.path().join("state").exists());
}

#[test]
fn a_huge_config_deadline_is_a_line_numbered_error() {
    let dir = tempfile::tempdir().unwrap();
    for (value, line) in [("18446744073709549568.0", 3), ("nan", 3), ("1e300", 3)] {
        std::fs::write(
            dir.path().join("coral.toml"),
            format!(
                "[[coral]]\nvm = \"3c6ef362-1f42-4a5d-9b1e-f6a9dbd967af\"\nreplug_timeout = {value}\n"
            ),
        )
        .unwrap();
        for command in [&["up"][..], &["--dry-run", "watch"][..]] {
            let out = coral(dir.path()).args(command).output().unwrap();
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{value} {command:?}: {stderr}");
            let first = stderr.lines().next().unwrap_or("");
            assert!(
                first.contains(&format!("coral.toml:{line}: replug_timeout = "))
                    && first.contains("at most 604800"),
                "{value} {command:?}: {stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        }
    }
}

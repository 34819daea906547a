//! The front door (issue 10.6): what a person or a boot service sees from the
//! built binary. `-q` is silent, no line shows twice on one output, global
//! flags work after the subcommand, bad values stop with exit 2 before any
//! `xe` call, `--help` names every environment variable, completions and a
//! man page exist, `-vv` traces the simulation, journald gets priorities,
//! and the README's Try-it works on a fresh clone.

use assert_cmd::Command;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
mod support;

const VARS_FROM_HOST: [&str; 6] = [
    "CORAL_FIRMWARE",
    "CORAL_FIRMWARE_DIR",
    "CORAL_XE",
    "CORAL_INVENTORY",
    "CORAL_LOCK",
    "JOURNAL_STREAM",
];

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coral"))
}

/// A fresh `--simulate` state file for each command: every run starts from
/// the power loss, whatever other tests (or the developer) simulated before.
fn fresh_sim_state() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    dir.path()
        .join(format!("sim-{}.json", NEXT.fetch_add(1, Ordering::SeqCst)))
}

/// A fresh `--simulate` state after `coral --simulate init`: the Coral is
/// ready at 2-4, not yet passed through (for the commands that expect one).
fn ready_sim_state() -> PathBuf {
    let state = fresh_sim_state();
    let out = coral()
        .env("CORAL_SIM_STATE", &state)
        .args(["--simulate", "init"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    state
}

/// The binary with the host's coral settings removed.
fn coral() -> Command {
    let mut cmd = Command::new(bin());
    for var in VARS_FROM_HOST {
        cmd.env_remove(var);
    }
    cmd.envs(support::isolated_env());
    cmd.env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir");
    cmd.env("CORAL_SIM_STATE", fresh_sim_state());
    cmd
}

/// The same, as a std command (for tests that choose where stdout/stderr go).
fn coral_std() -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    for var in VARS_FROM_HOST {
        cmd.env_remove(var);
    }
    cmd.envs(support::isolated_env());
    cmd.env("CORAL_FIRMWARE_DIR", "/nonexistent-coral-test-dir");
    cmd.env("CORAL_SIM_STATE", fresh_sim_state());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn quiet_prints_nothing_on_success() {
    for (args, ready) in [
        (
            &["-q", "--simulate", "up", "--vm", "frigate", "--restart"][..],
            false,
        ),
        (&["--simulate", "attach", "--vm", "frigate", "-q"][..], true),
        (&["--simulate", "init", "--quiet"][..], false),
    ] {
        let mut cmd = coral();
        if ready {
            cmd.env("CORAL_SIM_STATE", ready_sim_state());
        }
        let out = cmd.args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "", "{args:?} printed on stdout");
        assert_eq!(text(&out.stderr), "", "{args:?} printed on stderr");
    }
}

#[test]
fn quiet_still_prints_what_was_asked_for() {
    let out = coral()
        .args(["-q", "--simulate", "status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // A fresh simulation starts from the power loss: the boot loader at 1-4.
    assert_eq!(json["corals"][0]["path"], "1-4");
    assert_eq!(json["corals"][0]["usb_state"], "uninitialized");
}

/// Run with stdout and stderr on one file, as on a terminal or in the journal.
fn run_on_one_file(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("output");
    let file = File::create(&path).unwrap();
    let status = coral_std()
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .status()
        .unwrap();
    (status.code(), std::fs::read_to_string(&path).unwrap())
}

/// A log line without its `[LEVEL] ` or `<N>` prefix.
fn message(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((_, msg)) = rest.split_once("] ") {
            return msg;
        }
    }
    if line.starts_with('<') && line.get(2..3) == Some(">") {
        return &line[3..];
    }
    line
}

fn assert_no_line_twice(output: &str) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        *seen.entry(message(line)).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "shown more than once: {twice:?}\n{output}"
    );
}

#[test]
fn no_line_appears_twice_on_one_output() {
    for args in [
        &["--simulate", "attach", "--vm", "frigate"][..],
        &["--simulate", "up", "--vm", "frigate", "--restart"][..],
        &["--simulate", "detach", "--vm", "frigate"][..],
        &["--simulate", "init"][..],
    ] {
        let ready = ready_sim_state();
        let (code, output) = run_on_one_file(args, &[("CORAL_SIM_STATE", ready.to_str().unwrap())]);
        assert!(code.is_some(), "{args:?}");
        assert_no_line_twice(&output);
    }
    // The attach report is in there once.
    let ready = ready_sim_state();
    let (code, output) = run_on_one_file(
        &["--simulate", "attach", "--vm", "frigate"],
        &[("CORAL_SIM_STATE", ready.to_str().unwrap())],
    );
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(
        output.matches("created VUSB").count(),
        1,
        "the VUSB line once: {output}"
    );
}

#[test]
fn results_still_reach_stdout_when_it_is_a_pipe_of_its_own() {
    let out = coral()
        .env("CORAL_SIM_STATE", ready_sim_state())
        .args(["--simulate", "attach", "--vm", "frigate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("created VUSB"),
        "{}",
        text(&out.stdout)
    );
}

/// A host where a real run would start: inventory, a recording `xe`, a lock path.
struct FakeHost {
    dir: tempfile::TempDir,
}

impl FakeHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("inventory"),
            "INSTALLATION_UUID='9e3779b1-0001-4001-8000-000000000001'\n",
        )
        .unwrap();
        let xe = dir.path().join("xe");
        std::fs::write(
            &xe,
            format!(
                "#!/bin/sh\necho \"$@\" >> '{}'\nexit 1\n",
                dir.path().join("xe-calls").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&xe, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeHost { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn coral(&self) -> Command {
        let mut cmd = coral();
        cmd.env("CORAL_XE", self.path("xe"))
            .env("CORAL_INVENTORY", self.path("inventory"))
            .env("CORAL_LOCK", self.path("lock"));
        cmd
    }
}

#[test]
fn bad_values_stop_with_exit_2_before_any_xe_call_or_lock() {
    let host = FakeHost::new();
    let root = host.path("root");
    let root = root.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["up", "--vm", "frigate", "--timeout", "0"], "--timeout"),
        (vec!["init", "--timeout", "0"], "--timeout"),
        (
            vec!["attach", "--vm", "frigate", "--scan-timeout", "0"],
            "--scan-timeout",
        ),
        (
            vec!["up", "--vm", "frigate", "--scan-timeout", "0"],
            "--scan-timeout",
        ),
        (
            vec!["attach", "--vm", "frigate", "--shutdown-timeout=-5"],
            "--shutdown-timeout",
        ),
        (vec!["up", "--vm", ""], "--vm"),
        (vec!["attach", "--vm", "   "], "--vm"),
        (vec!["detach", "--vm", ""], "--vm"),
        (vec!["attach", "--vm", "fri\u{1b}[2Jgate"], "--vm"),
        (
            vec!["up", "--vm", "frigate\nExecStartPre=/bin/evil"],
            "--vm",
        ),
        (
            vec!["service", "install", "--vm", "a\tb", "--root", root],
            "--vm",
        ),
        (
            vec!["attach", "--vm", "frigate", "--lock-timeout=nan"],
            "--lock-timeout",
        ),
    ];
    for (args, flag) in cases {
        let out = host.coral().args(&args).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?} names {flag}: {stderr}");
        assert!(
            !stderr.contains('\u{1b}'),
            "control characters are not echoed: {stderr:?}"
        );
        assert!(!host.path("xe-calls").exists(), "{args:?} ran xe");
        assert!(!host.path("lock").exists(), "{args:?} took the lock");
        assert!(!Path::new(root).exists(), "{args:?} wrote a unit");
    }
}

#[test]
fn lock_flags_work_after_the_subcommand() {
    let host = FakeHost::new();
    let lock_path = host.path("held.lock");
    let held = File::create(&lock_path).unwrap();
    held.lock().unwrap();
    let out = host
        .coral()
        .args(["attach", "--vm", "frigate", "--no-wait", "--lock-file"])
        .arg(&lock_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&lock_path.display().to_string()),
        "names the lock it found held: {}",
        text(&out.stderr)
    );
    let out = host
        .coral()
        .args([
            "up",
            "--vm",
            "frigate",
            "--lock-timeout",
            "0.2",
            "--lock-file",
        ])
        .arg(&lock_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    assert!(
        !host.path("xe-calls").exists(),
        "no xe call without the lock"
    );
}

/// Environment variables the product reads: every `env::var`/`var_os`
/// literal, clap `env = "…"`, and `"CORAL_…"` constant in src/ (the fake
/// `xe` under src/bin is a test tool, not the product).
fn environment_variables_read_by_the_source() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name() != Some("bin".as_ref()) {
                    walk(&path, out);
                }
            } else if path.extension() == Some("rs".as_ref()) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut names = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for marker in ["var_os(\"", "var(\"", "env = \"", "\"CORAL_"] {
            for (at, _) in source.match_indices(marker) {
                let start = at + marker.len() - if marker == "\"CORAL_" { 6 } else { 0 };
                let name: String = source[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name.len() > 2 && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    names
}

#[test]
fn help_lists_every_environment_variable_the_tool_reads() {
    let names = environment_variables_read_by_the_source();
    for expected in [
        "CORAL_XE",
        "CORAL_INVENTORY",
        "CORAL_FIRMWARE",
        "JOURNAL_STREAM",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "scanner missed {expected}: {names:?}"
        );
    }
    let out = coral().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    let section = help
        .split_once("Environment:")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no Environment section in --help:\n{help}"));
    for name in &names {
        assert!(
            section
                .lines()
                .any(|l| l.trim_start().starts_with(name.as_str())),
            "--help does not list {name}:\n{help}"
        );
    }
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F _coral"),
        ("zsh", "#compdef coral"),
        ("fish", "complete -c coral"),
    ] {
        let out = coral().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        for word in ["attach", "firmware", "lock-timeout", "scan-timeout"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("coral.bash");
            std::fs::write(&file, &script).unwrap();
            let check = std::process::Command::new("bash")
                .arg("-n")
                .arg(&file)
                .status()
                .unwrap();
            assert!(check.success(), "bash -n rejects the completion script");
        }
    }
    let out = coral().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_page_documents_commands_environment_and_exit_codes() {
    let out = coral().arg("man").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH coral 1"), "{page}");
    // One roff preamble, not one per section.
    assert_eq!(page.matches(".ie \\n(.g .ds Aq").count(), 1, "{page}");
    for section in [
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH ENVIRONMENT",
        ".SH \"EXIT STATUS\"",
    ] {
        assert!(page.contains(section), "{section} missing:\n{page}");
    }
    for name in environment_variables_read_by_the_source() {
        assert!(page.contains(&name.replace('-', "\\-")), "{name} missing");
    }
    assert!(page.contains("coral\\-up(1)"), "refers to coral-up(1)");

    let dir = tempfile::tempdir().unwrap();
    let out = coral()
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in [
        "coral.1",
        "coral-up.1",
        "coral-attach.1",
        "coral-service-install.1",
    ] {
        let page = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(page.starts_with(".ie") || page.starts_with(".TH"), "{name}");
    }
    let top = std::fs::read_to_string(dir.path().join("coral.1")).unwrap();
    assert!(
        top.contains(".SH ENVIRONMENT"),
        "coral.1 in --dir is the full page"
    );
}

#[test]
fn very_verbose_traces_every_usb_request_and_xe_call_under_simulate() {
    let out = coral()
        .args(["--simulate", "-vv", "up", "--vm", "frigate", "--restart"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let count = |prefix: &str| {
        stderr
            .lines()
            .filter(|l| l.starts_with(&format!("[TRACE] {prefix} ")))
            .count()
    };
    // The stand-in image is 10,783 bytes in 256-byte blocks: 43 blocks and
    // the zero-length one, each followed by GETSTATUS, and the read-back.
    assert_eq!(count("DNLOAD"), 44, "{stderr}");
    assert!(count("GETSTATUS") >= 45, "{stderr}");
    assert_eq!(count("UPLOAD"), 43, "{stderr}");
    assert!(stderr.contains("[TRACE] port reset"), "{stderr}");
    // (No `pusb-scan`: after its own reset coral lets udev's scans list the Coral.)
    for command in [
        "pusb-list",
        "pusb-param-set",
        "vm-list",
        "vusb-create",
        "vm-shutdown",
        "vm-start",
    ] {
        assert!(
            stderr.contains(&format!("[TRACE] xe {command} ")),
            "xe {command} not traced: {stderr}"
        );
    }
    // One trace line per call: every mutating call the simulation made is there once.
    assert_eq!(count("xe vusb-create"), 1, "{stderr}");
    assert_eq!(count("xe vm-start"), 1, "{stderr}");
}

/// The `-vv` lines that name DFU requests, without the `[TRACE] ` prefix.
fn dfu_trace(stderr: &str) -> Vec<String> {
    const NAMES: [&str; 7] = [
        "DNLOAD ",
        "UPLOAD ",
        "GETSTATUS",
        "CLRSTATUS",
        "ABORT",
        "DETACH",
        "GETSTATE",
    ];
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[TRACE] "))
        .filter(|l| NAMES.iter().any(|n| l.starts_with(n)))
        .map(str::to_string)
        .collect()
}

#[test]
fn very_verbose_names_every_dfu_request_as_dfu_util_users_read_them() {
    let state = fresh_sim_state();
    let out = coral()
        .env("CORAL_SIM_STATE", &state)
        .args(["--simulate", "-vv", "init"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The stand-in image: 10,783 bytes, 42 blocks of 256 and one of 31.
    let block_len = |i: usize| if i < 42 { 256 } else { 31 };
    let mut expected = vec!["GETSTATUS → dfuIDLE".to_string()];
    for i in 0..43 {
        expected.push(format!("DNLOAD block {i}: {} bytes", block_len(i)));
        expected.push("GETSTATUS → dfuDNLOAD-IDLE".to_string());
    }
    expected.push("DNLOAD block 43: 0 bytes".to_string());
    expected.push("GETSTATUS → dfuIDLE".to_string());
    for i in 0..43 {
        expected.push(format!("UPLOAD block {i}: {} bytes", block_len(i)));
    }
    assert_eq!(dfu_trace(&stderr), expected, "{stderr}");
    assert!(!stderr.contains("control out"), "{stderr}");

    // A ready Coral sent back to its boot loader: DETACH, then the download again.
    let out = coral()
        .env("CORAL_SIM_STATE", &state)
        .args(["--simulate", "-vv", "init", "--force"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let trace = dfu_trace(&stderr);
    assert_eq!(trace[0], "DETACH (wTimeout 100 ms)", "{stderr}");
    assert_eq!(trace[1..], expected[..], "{stderr}");
}

/// `DEVICE:INODE` of an open file, as systemd writes `JOURNAL_STREAM`.
fn journal_stream_of(file: &File) -> String {
    let meta = file.metadata().unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Run with stderr on a file; JOURNAL_STREAM names that file, or another.
fn run_with_journal(args: &[&str], stream_is_stderr: bool) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr");
    let file = File::create(&path).unwrap();
    let other = File::create(dir.path().join("other")).unwrap();
    let stream = journal_stream_of(if stream_is_stderr { &file } else { &other });
    let status = coral_std()
        .args(args)
        .env("JOURNAL_STREAM", stream)
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .status()
        .unwrap();
    (status.code(), std::fs::read_to_string(&path).unwrap())
}

#[test]
fn log_lines_carry_journald_priorities_when_stderr_is_the_journal() {
    let (code, log) = run_with_journal(&["--simulate", "up", "--vm", "frigate"], true);
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.is_empty());
    for line in log.lines() {
        assert!(
            line.len() > 3 && line.starts_with('<') && &line[2..3] == ">",
            "no priority prefix: {line:?}\n{log}"
        );
    }
    assert!(log.contains("<6>uploading 10783 bytes"), "{log}");
    assert!(
        log.contains("<4>simulation: no firmware configured"),
        "{log}"
    );

    let (code, log) = run_with_journal(&["--simulate", "up", "--vm", "no such vm"], true);
    assert_eq!(code, Some(8), "{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.starts_with("<3>coral: "), "{log}");

    // A stderr that is not the stream systemd named gets no prefixes.
    let (code, log) = run_with_journal(&["--simulate", "up", "--vm", "frigate"], false);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.lines().all(|l| !l.starts_with('<')), "{log}");
    assert!(log.contains("[INFO] uploading 10783 bytes"), "{log}");
}

/// The shell blocks of README.md's "Try it" section.
fn readme_try_it_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Try it")
        .nth(1)
        .expect("README has a Try it section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block && line.starts_with("cargo run") {
            commands.push(line.to_string());
        }
    }
    commands
}

/// `cargo run --release -- ARGS` as ARGS.
fn cargo_run_args(command: &str) -> Vec<&str> {
    command
        .split_once(" -- ")
        .expect("cargo run --release -- ARGS")
        .1
        .split_whitespace()
        .collect()
}

#[test]
fn readme_try_it_works_on_a_fresh_clone_without_shared() {
    let commands = readme_try_it_commands();
    assert!(commands.len() >= 3, "three steps: {commands:?}");
    assert!(!commands[0].contains("--firmware"), "{}", commands[0]);
    // A fresh clone: no ../shared beside the working directory.
    let fresh = tempfile::tempdir().unwrap();
    let out = coral()
        .current_dir(fresh.path())
        .args(cargo_run_args(&commands[0]))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {}",
        commands[0],
        text(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("up: firmware uploaded, Coral ready at 2-4"),
        "{stdout}"
    );

    // Step 2: the fetch supplies the image the run then names.
    let fetch = commands
        .iter()
        .find(|c| c.contains(" firmware fetch"))
        .expect("step 2 fetches the image");
    let with_image = commands
        .iter()
        .find(|c| c.contains("--firmware"))
        .expect("step 2 runs with the image");
    let fetch_args = cargo_run_args(fetch);
    let dir = fetch_args[fetch_args.iter().position(|a| *a == "--dir").unwrap() + 1];
    let run_args = cargo_run_args(with_image);
    let image = run_args[run_args.iter().position(|a| *a == "--firmware").unwrap() + 1];
    assert_eq!(
        Path::new(image).parent().unwrap(),
        Path::new(dir),
        "the run names the file the fetch writes"
    );
    // Before the fetch, the run says what to do (exit 4, the next step).
    let out = coral()
        .current_dir(fresh.path())
        .args(&run_args)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        error_line(&stderr).contains("`coral firmware fetch`"),
        "{stderr}"
    );
    // The fetch itself, from a local copy of the pinned image when there is one.
    let Some(real) = support::shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let base = format!("file://{}", real.parent().unwrap().display());
    let out = coral()
        .current_dir(fresh.path())
        .env("CORAL_FIRMWARE_URL_BASE", base)
        .args(&fetch_args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{fetch}: {}", text(&out.stderr));
    let out = coral()
        .current_dir(fresh.path())
        .args(&run_args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{with_image}: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("up: firmware uploaded, Coral ready at 2-4"),
        "{stdout}"
    );
    assert!(
        !text(&out.stderr).contains("stand-in"),
        "the real image, not the stand-in: {}",
        text(&out.stderr)
    );
}

/// The last `coral: …` line of a run's stderr.
fn error_line(stderr: &str) -> String {
    stderr
        .lines()
        .rfind(|l| l.starts_with("coral: "))
        .unwrap_or_default()
        .to_string()
}

/// (case, args, extra environment, words of the next step)
type FirmwareCase<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, String)>, &'a [&'a str]);

#[test]
fn every_firmware_error_names_its_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let installed = d.join("installed");
    std::fs::write(d.join("empty.bin"), b"").unwrap();
    std::fs::write(d.join("bad.bin"), vec![0x55u8; 10_783]).unwrap();
    std::fs::create_dir(d.join("server")).unwrap();
    std::fs::write(
        d.join("server/apex_latest_single_ep.bin"),
        vec![0x55u8; 10_783],
    )
    .unwrap();
    let s = |p: &Path| p.display().to_string();
    let bad = s(&d.join("bad.bin"));
    let empty = s(&d.join("empty.bin"));
    let missing = s(&d.join("missing.bin"));
    let server = format!("file://{}", s(&d.join("server")));
    let nowhere = format!("file://{}", s(&d.join("nowhere")));
    let cases: Vec<FirmwareCase> = vec![
        (
            "nothing configured",
            vec!["firmware", "show"],
            vec![],
            &["coral firmware fetch", "into ", "--firmware FILE"],
        ),
        (
            "$CORAL_FIRMWARE unreadable",
            vec!["firmware", "show"],
            vec![("CORAL_FIRMWARE", missing.clone())],
            &["coral firmware fetch", "--firmware"],
        ),
        (
            "--firmware missing (README step 2 on a plain clone)",
            vec![
                "--simulate",
                "up",
                "--vm",
                "frigate",
                "--restart",
                "--firmware",
                "target/firmware/apex_latest_single_ep.bin",
            ],
            vec![],
            &["coral firmware fetch", "--firmware"],
        ),
        (
            "install: file missing",
            vec!["firmware", "install", &missing],
            vec![],
            &["coral firmware fetch"],
        ),
        (
            "install: empty file",
            vec!["firmware", "install", &empty],
            vec![],
            &["apex_latest_single_ep.bin", "coral firmware fetch"],
        ),
        (
            "install: unknown image",
            vec!["firmware", "install", &bad],
            vec![],
            &["coral firmware fetch", "--allow-unknown-firmware"],
        ),
        (
            "install: directory not writable",
            vec![
                "firmware",
                "install",
                "--allow-unknown-firmware",
                &bad,
                "--dir",
                "/dev/null/coral",
            ],
            vec![],
            &["--dir"],
        ),
        (
            "fetch: download fails",
            vec!["firmware", "fetch"],
            vec![("CORAL_FIRMWARE_URL_BASE", nowhere)],
            &["on a machine that can", "coral firmware install FILE --dir"],
        ),
        (
            "fetch: the host does not resolve (curl retries: one line still)",
            vec!["firmware", "fetch"],
            vec![(
                "CORAL_FIRMWARE_URL_BASE",
                "https://coral-test.invalid".to_string(),
            )],
            &["on a machine that can", "coral firmware install FILE --dir"],
        ),
        (
            "fetch: not the pinned image",
            vec!["firmware", "fetch"],
            vec![("CORAL_FIRMWARE_URL_BASE", server)],
            &[
                "rerun `coral firmware fetch`",
                "coral firmware install FILE",
            ],
        ),
        (
            "fetch: no curl",
            vec!["firmware", "fetch"],
            vec![("PATH", s(&d.join("empty-path")))],
            &["on a machine that can", "coral firmware install FILE --dir"],
        ),
    ];
    for (case, args, env, words) in cases {
        let out = coral()
            .current_dir(d)
            .env("CORAL_FIRMWARE_DIR", &installed)
            .envs(env)
            .args(&args)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{case}: {stderr}");
        let line = error_line(&stderr);
        assert_eq!(
            stderr.trim_end().lines().last(),
            Some(line.as_str()),
            "{case}: the failure is one line, the last: {stderr}"
        );
        let (_, next) = line
            .split_once("; ")
            .unwrap_or_else(|| panic!("{case}: no next step: {line}"));
        for word in words {
            assert!(next.contains(word), "{case}: {word:?} missing: {line}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(&installed)
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failure left files behind: {left:?}");
}

/// `coral ARGS --help`, stdout.
fn help(args: &[&str]) -> String {
    let out = coral().args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The help line of `flag` (its first line).
fn help_line<'a>(help: &'a str, flag: &str) -> &'a str {
    help.lines()
        .find(|l| l.trim_start().starts_with(flag))
        .unwrap_or_else(|| panic!("{flag} missing: {help}"))
}

#[test]
fn help_says_what_happens() {
    let install = help(&["service", "install"]);
    for unit in ["coral-up.service", "coral-watch.service"] {
        assert!(install.contains(unit), "{unit}: {install}");
    }
    assert!(
        install.contains("Usage: coral service install [OPTIONS] --vm <UUID|NAME>"),
        "--vm is required: {install}"
    );
    let vm = help_line(&install, "--vm");
    assert!(!vm.contains("without it"), "{vm}");
    for flag in ["--start", "--restart"] {
        let line = help_line(&install, flag);
        assert!(line.contains("boot") && line.contains("entry"), "{line}");
    }
    let service = help(&["service"]);
    assert!(
        service.contains("coral-watch.service") && service.contains("coral watch"),
        "{service}"
    );
    // Global options under their own heading, after the command's own.
    for args in [&[][..], &["up"][..], &["service", "install"][..]] {
        let text = help(args);
        let (own, global) = text
            .split_once("Global options:")
            .unwrap_or_else(|| panic!("{args:?}: no global heading: {text}"));
        for flag in [
            "--simulate",
            "--dry-run",
            "--quiet",
            "--lock-file",
            "--no-wait",
        ] {
            assert!(global.contains(flag), "{args:?}: {flag} not global: {text}");
            assert!(
                !own.contains(flag),
                "{args:?}: {flag} among own options: {text}"
            );
        }
    }
    let top = help(&[]);
    let dry_run = help_line(&top, "--dry-run");
    assert!(
        dry_run.contains("write no file") && dry_run.contains("would"),
        "{dry_run}"
    );
}

//! `coral init` end to end: the built binary, the real libusb, and the
//! umockdev-emulated Coral; asserts the bytes the device received, its final
//! identity, and every control transfer.

mod support;

use support::{coral_under, emulate, shared_firmware, umockdev_available};

const DFU_OUT: u64 = 0x21;
const DFU_IN: u64 = 0xA1;
const DNLOAD: u64 = 1;
const UPLOAD: u64 = 2;
const GETSTATUS: u64 = 3;

fn firmware_arg(path: &std::path::Path) -> String {
    path.display().to_string()
}

#[test]
fn both_images_upload_with_exactly_the_protocol_minimum_and_come_back_ready() {
    if !umockdev_available() {
        return;
    }
    for (name, size) in [
        ("apex_latest_single_ep.bin", "256"),
        ("apex_latest_multi_ep.bin", "64"),
    ] {
        let Some(image_path) = shared_firmware(name) else {
            return;
        };
        let image = std::fs::read(&image_path).unwrap();
        let fw = firmware_arg(&image_path);
        let run = coral_under(
            &["--transfer-size", size],
            &["init", "--firmware", &fw],
            &[],
        );
        assert_eq!(run.status, Some(0), "{}", run.stderr);
        assert_eq!(
            run.received(),
            image,
            "{name}: the device received the image"
        );
        assert_eq!(
            run.devices(),
            vec![("2-4".to_string(), "18d1:9302".to_string())]
        );
        assert!(run.stdout.contains("Coral ready at 2-4"), "{}", run.stdout);

        let block: usize = size.parse().unwrap();
        let blocks = image.len().div_ceil(block);
        let uploads = image.len() / block + 1;
        assert_eq!(run.count(DFU_OUT, DNLOAD), blocks + 1, "{name}");
        assert_eq!(
            run.count(DFU_IN, GETSTATUS),
            blocks + 2,
            "{name}: one initial state check"
        );
        assert_eq!(run.count(DFU_IN, UPLOAD), uploads, "{name}");
        assert_eq!(
            run.requests().len(),
            2 * blocks + 3 + uploads,
            "{name}: nothing else on the wire"
        );
    }
}

#[test]
fn an_already_ready_coral_gets_no_request() {
    if !umockdev_available() {
        return;
    }
    let run = coral_under(&["--state", "ready"], &["init"], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(run.requests().is_empty(), "{:?}", run.requests());
    assert!(run.stdout.contains("already ready"), "{}", run.stdout);
}

#[test]
fn a_wrong_image_is_refused_before_any_usb_traffic() {
    if !umockdev_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("apex_latest_single_ep.bin");
    std::fs::write(&bad, vec![0u8; 10_783]).unwrap();
    let run = coral_under(
        &[],
        &["init", "--firmware", &bad.display().to_string()],
        &[],
    );
    assert_eq!(run.status, Some(4));
    assert!(run.requests().is_empty());
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("not a known Coral image"),
        "{}",
        run.stderr
    );
}

#[test]
fn no_coral_is_exit_3_and_no_firmware_is_exit_4_with_how_to_get_one() {
    if !umockdev_available() {
        return;
    }
    let run = coral_under(&["--state", "none"], &["init"], &[]);
    assert_eq!(run.status, Some(3), "{}", run.stderr);
    assert!(run.stderr.contains("no Coral found"), "{}", run.stderr);

    let run = coral_under(&[], &["init"], &[]);
    assert_eq!(run.status, Some(4), "{}", run.stderr);
    assert!(
        run.stderr.contains("coral firmware fetch"),
        "{}",
        run.stderr
    );
    assert!(run.requests().is_empty());
}

#[test]
fn a_device_that_vanishes_mid_upload_fails_cleanly_and_a_rerun_after_replug_succeeds() {
    if !umockdev_available() {
        return;
    }
    let Some(image_path) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let image = std::fs::read(&image_path).unwrap();
    let coral = support::coral_bin().display().to_string();
    let fw = firmware_arg(&image_path);
    // First run fails when the device drops off; it is replugged 100 ms later
    // as a fresh boot loader, and the second run must succeed.
    let script = format!(
        "'{coral}' init --firmware '{fw}'; echo \"first=$?\"; sleep 0.5; '{coral}' init --firmware '{fw}'; echo \"second=$?\""
    );
    let run = emulate(
        &[
            "--vanish-at-block".into(),
            "17".into(),
            "--replug-ms".into(),
            "100".into(),
        ],
        &["/bin/sh".into(), "-c".into(), script],
        &[],
    );
    assert!(
        run.stdout.contains("first=5"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("second=0"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(run.error_lines().len(), 1);
    assert!(
        run.stderr
            .contains("disappeared during the firmware upload (DNLOAD block 18 of 43)"),
        "{}",
        run.stderr
    );
    assert_eq!(run.received(), image);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
}

#[test]
fn a_stall_leaves_a_device_the_rerun_recovers_from() {
    if !umockdev_available() {
        return;
    }
    let Some(image_path) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let coral = support::coral_bin().display().to_string();
    let fw = firmware_arg(&image_path);
    let script = format!(
        "'{coral}' init --firmware '{fw}'; echo \"first=$?\"; '{coral}' init --firmware '{fw}'; echo \"second=$?\""
    );
    let run = emulate(
        &["--stall-at-block".into(), "5".into()],
        &["/bin/sh".into(), "-c".into(), script],
        &[],
    );
    assert!(
        run.stdout.contains("first=5") && run.stdout.contains("second=0"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stderr.contains("stalled"), "{}", run.stderr);
    assert_eq!(
        run.count(DFU_OUT, 4),
        1,
        "the rerun cleared dfuERROR with one CLRSTATUS"
    );
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
}

#[test]
fn very_verbose_names_each_dfu_request_through_libusb_with_the_status_when_not_ok() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let coral = support::coral_bin().display().to_string();
    let script = format!(
        "'{coral}' -vv init --firmware '{fw}'; echo \"first=$?\"; '{coral}' -vv init --firmware '{fw}'; echo \"second=$?\""
    );
    let run = emulate(
        &["--stall-at-block".into(), "5".into()],
        &["/bin/sh".into(), "-c".into(), script],
        &[],
    );
    assert!(
        run.stdout.contains("first=5") && run.stdout.contains("second=0"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    let trace: Vec<&str> = run
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("[TRACE] "))
        .collect();
    let position = |line: &str| {
        trace
            .iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("no {line:?} in {}", run.stderr))
    };
    // First run: the stalled block, by name.
    let stalled = trace
        .iter()
        .position(|l| l.starts_with("DNLOAD block 5 failed: "))
        .unwrap_or_else(|| panic!("{}", run.stderr));
    // Second run: the error state with its status, cleared, then the download.
    let error = position("GETSTATUS → dfuERROR, status errSTALLEDPKT");
    assert!(stalled < error);
    assert_eq!(trace[error + 1], "CLRSTATUS", "{}", run.stderr);
    assert_eq!(trace[error + 2], "GETSTATUS → dfuIDLE", "{}", run.stderr);
    let last = image.len() - 42 * 256;
    let after = &trace[error..];
    assert_eq!(
        after
            .iter()
            .filter(|l| l.starts_with("DNLOAD block "))
            .count(),
        44,
        "{}",
        run.stderr
    );
    assert!(after.contains(&format!("DNLOAD block 42: {last} bytes").as_str()));
    assert!(after.contains(&"DNLOAD block 43: 0 bytes"));
    assert!(after.contains(&format!("UPLOAD block 42: {last} bytes").as_str()));
    assert!(!run.stderr.contains("control out"), "{}", run.stderr);
}

#[test]
fn no_re_enumeration_is_a_timeout_exit_6() {
    if !umockdev_available() {
        return;
    }
    let Some(image_path) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let fw = firmware_arg(&image_path);
    let run = coral_under(
        &["--no-reenumerate"],
        &["init", "--timeout", "0.5", "--firmware", &fw],
        &[],
    );
    assert_eq!(run.status, Some(6), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("did not come back as 18d1:9302 within 0.5 s"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_corrupted_read_back_is_a_verification_error() {
    if !umockdev_available() {
        return;
    }
    let Some(image_path) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let fw = firmware_arg(&image_path);
    let run = coral_under(&["--corrupt-readback"], &["init", "--firmware", &fw], &[]);
    assert_eq!(run.status, Some(5), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("read-back differs from the image at byte 5391"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.devices(),
        vec![("1-4".to_string(), "1a6e:089a".to_string())],
        "no reset after a bad read-back"
    );
}

#[test]
fn dfu_util_an_independent_dfu_host_accepts_the_emulated_coral() {
    if !umockdev_available() {
        return;
    }
    if !std::path::Path::new("/usr/bin/dfu-util").exists() {
        support::skip("dfu-util is not installed");
        return;
    }
    let Some(image_path) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let image = std::fs::read(&image_path).unwrap();
    let run = emulate(
        &[],
        &[
            "dfu-util".into(),
            "-d".into(),
            "1a6e:089a".into(),
            "-D".into(),
            image_path.display().to_string(),
            "-R".into(),
        ],
        &[],
    );
    assert_eq!(
        run.received(),
        image,
        "dfu-util's download reached the emulated device\n{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
}

#[test]
fn force_sends_a_ready_coral_back_to_dfu_and_reflashes_it() {
    if !umockdev_available() {
        return;
    }
    let Some(image_path) = shared_firmware("apex_latest_single_ep.bin") else {
        return;
    };
    let image = std::fs::read(&image_path).unwrap();
    let fw = firmware_arg(&image_path);
    let run = coral_under(
        &["--state", "ready"],
        &["init", "--force", "--firmware", &fw],
        &[],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        run.requests()[0],
        (DFU_OUT, 0),
        "DFU_DETACH on interface 0 first"
    );
    assert_eq!(run.received(), image);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
}

// --- The Coral as real hosts show it (issue 9) --------------------------------

/// The single-endpoint image's path and bytes, when umockdev and the image are here.
fn prerequisites() -> Option<(String, Vec<u8>)> {
    if !umockdev_available() {
        return None;
    }
    let path = shared_firmware("apex_latest_single_ep.bin")?;
    let bytes = std::fs::read(&path).unwrap();
    Some((firmware_arg(&path), bytes))
}

/// `coral ARGS` under a generous watchdog: a hang on the old code fails the
/// test instead of holding the suite (not a timing threshold).
fn watched(args: &[&str]) -> Vec<String> {
    let mut command = vec![
        "/usr/bin/timeout".to_string(),
        "120".to_string(),
        support::coral_bin().display().to_string(),
    ];
    command.extend(args.iter().map(|s| s.to_string()));
    command
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn flashed_at(run: &support::Run, path: &str) -> Vec<u8> {
    run.result["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["path"] == path))
        .and_then(|d| d["flashed"].as_str())
        .map(|h| hex::decode(h).unwrap())
        .unwrap_or_default()
}

#[test]
fn an_unrelated_ready_coral_on_another_controller_is_not_taken_for_ours() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = coral_under(
        &["--other-ready", "4-4"],
        &["init", "--device", "1-4", "--firmware", &fw],
        &[],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("Coral ready at 2-4"), "{}", run.stdout);
    let mut devices = run.devices();
    devices.sort();
    assert_eq!(
        devices,
        vec![
            ("2-4".to_string(), "18d1:9302".to_string()),
            ("4-4".to_string(), "18d1:9302".to_string())
        ]
    );
    assert_eq!(flashed_at(&run, "2-4"), image);
}

#[test]
fn a_port_whose_peer_has_another_number_is_found_through_sysfs() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = coral_under(
        &["--path", "1-5", "--ready-path", "2-3", "--peer", "1-5=2-3"],
        &[
            "init",
            "--device",
            "1-5",
            "--timeout",
            "5",
            "--firmware",
            &fw,
        ],
        &[],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("Coral ready at 2-3"), "{}", run.stdout);
    assert_eq!(
        run.devices(),
        vec![("2-3".to_string(), "18d1:9302".to_string())]
    );
    assert_eq!(run.received(), image);
}

#[test]
fn two_corals_with_crossed_peer_numbers_each_come_back_at_their_own_port() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = coral_under(
        &[
            "--path",
            "1-5",
            "--ready-path",
            "2-3",
            "--peer",
            "1-5=2-3",
            "--peer",
            "1-3=2-5",
            "--second-coral",
            "1-3:2-5",
        ],
        &["init", "--timeout", "5", "--firmware", &fw],
        &[],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let mut devices = run.devices();
    devices.sort();
    assert_eq!(
        devices,
        vec![
            ("2-3".to_string(), "18d1:9302".to_string()),
            ("2-5".to_string(), "18d1:9302".to_string())
        ]
    );
    assert_eq!(flashed_at(&run, "2-3"), image);
    assert_eq!(flashed_at(&run, "2-5"), image);
    for line in ["Coral ready at 2-3", "Coral ready at 2-5"] {
        assert!(run.stdout.contains(line), "{}", run.stdout);
    }
}

#[test]
fn a_reset_that_fails_with_eio_still_leads_to_the_ready_device() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = coral_under(&["--reset-errno", "EIO"], &["init", "--firmware", &fw], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
    assert_eq!(run.received(), image);
}

#[test]
fn a_boot_loader_that_comes_back_as_1a6e_089a_fails_at_once_with_exit_5() {
    let Some((fw, _)) = prerequisites() else {
        return;
    };
    let run = emulate(
        &args(&["--reenumerate-as", "bootloader"]),
        &watched(&["init", "--timeout", "600", "--firmware", &fw]),
        &[],
    );
    assert_eq!(run.status, Some(5), "{}", run.stderr);
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("came back as 1a6e:089a again")
            && run.stderr.contains("did not take the image"),
        "{}",
        run.stderr
    );
}

#[test]
fn garbled_poll_timeouts_are_capped_and_the_upload_completes() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = emulate(
        &args(&[
            "--transfer-size",
            "4096",
            "--busy-polls",
            "1",
            "--manifest-polls",
            "1",
            "--poll-ms",
            "5",
            "--garbled-poll-timeout",
        ]),
        &watched(&["init", "--firmware", &fw]),
        &[],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(run.received(), image);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
}

#[test]
fn an_endless_upload_is_read_only_to_the_image_and_one_block() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = coral_under(&["--endless-upload"], &["init", "--firmware", &fw], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(run.count(DFU_IN, UPLOAD), image.len() / 256 + 1);
    assert_eq!(run.count(DFU_OUT, 6), 1, "one ABORT ends the upload");
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
}

#[test]
fn a_boot_loader_left_busy_or_manifesting_by_an_interrupted_run_is_waited_out() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    for knobs in [
        ["--start-state", "3", "--busy-polls", "1", "--poll-ms", "10"],
        [
            "--start-state",
            "6",
            "--manifest-polls",
            "2",
            "--poll-ms",
            "10",
        ],
    ] {
        let run = coral_under(&knobs, &["init", "--firmware", &fw], &[]);
        assert_eq!(run.status, Some(0), "{knobs:?}: {}", run.stderr);
        assert_eq!(run.received(), image, "{knobs:?}");
        assert_eq!(
            run.devices(),
            vec![("2-4".to_string(), "18d1:9302".to_string())]
        );
    }
}

#[test]
fn a_late_boot_loader_is_waited_for_with_wait_device_only() {
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    let run = coral_under(
        &["--appear-after-ms", "1500"],
        &["init", "--wait-device", "30", "--firmware", &fw],
        &[],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(run.received(), image);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );

    let run = coral_under(
        &["--appear-after-ms", "1500"],
        &["init", "--firmware", &fw],
        &[],
    );
    assert_eq!(
        run.status,
        Some(3),
        "without --wait-device: at once\n{}",
        run.stderr
    );
    assert!(run.requests().is_empty());
}

#[test]
fn up_waits_for_a_boot_loader_that_appears_after_it_started() {
    use coral_testkit::xapi::PowerState;
    use support::{fast_config, pool, vusbs_on_ready_group, FakeXapi};
    let Some((fw, image)) = prerequisites() else {
        return;
    };
    // At boot: the VM halted, XAPI's scan saw no Coral yet.
    let (world, host, vm) = pool(fast_config(), "frigate", PowerState::Halted, vec![]);
    let xapi = FakeXapi::new(world, &host);
    let mut emulator = args(&["--state", "uninitialized", "--appear-after-ms", "1500"]);
    emulator.extend(xapi.bus_args());
    let run = emulate(
        &emulator,
        &watched(&["up", "--vm", "frigate", "--firmware", &fw]),
        &xapi.env(),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(run.received(), image);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, false)]
    );
    assert!(world.power_history.is_empty(), "{:?}", world.power_history);
}

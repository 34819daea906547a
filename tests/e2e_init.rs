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

//! `coral init` against the in-process simulated Coral: the DFU host's
//! protocol (exact requests), both real images, block sizes, every fault
//! knob with its error, and a rerun that succeeds after each failure.

use coral::clock::{Clock, VirtualClock};
use coral::dfu::{state, status, DFU_DNLOAD, DFU_GETSTATUS, DFU_UPLOAD};
use coral::error::exit_code_of;
use coral::firmware::{FirmwareImage, FirmwareSource};
use coral::ops::init::{init, InitOptions, InitOutcome};
use coral::sim::coral::{SimBus, SimCoralConfig, SimFaults};
use coral::usb::{CoralState, PortPath, UsbBus, UsbError};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

fn image_of(bytes: Vec<u8>) -> FirmwareImage {
    FirmwareImage {
        sha256: String::new(),
        bytes,
        source: FirmwareSource::Flag("test.bin".into()),
        known_name: None,
    }
}

fn synthetic(len: usize) -> FirmwareImage {
    image_of((0..len).map(|i| (i * 31 % 253) as u8).collect())
}

fn shared_image(name: &str) -> Option<FirmwareImage> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/firmware")
        .join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Some(image_of(bytes)),
        Err(_) => {
            eprintln!("skipped: {} is absent", path.display());
            None
        }
    }
}

struct Rig {
    clock: Rc<VirtualClock>,
    bus: SimBus,
}

fn rig(config: SimCoralConfig) -> Rig {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    bus.add_coral(config, CoralState::Uninitialized);
    Rig { clock, bus }
}

fn opts() -> InitOptions {
    InitOptions {
        device: None,
        force: false,
        replug_timeout: Duration::from_secs(10),
        wait_device: Duration::ZERO,
    }
}

fn run(rig: &Rig, image: &FirmwareImage) -> anyhow::Result<Vec<InitOutcome>> {
    let mut loads = 0;
    let mut load = || {
        loads += 1;
        Ok(image.clone())
    };
    let result = init(&rig.bus, rig.clock.as_ref(), &mut load, &opts());
    assert!(loads <= 1, "firmware loaded at most once");
    result
}

fn count(rig: &Rig, request: u8) -> usize {
    rig.bus
        .requests()
        .iter()
        .filter(|r| r.request == request)
        .count()
}

fn ready_at_2_4(rig: &Rig) {
    let corals = rig.bus.list_corals().unwrap();
    assert_eq!(corals.len(), 1);
    assert_eq!(corals[0].state, CoralState::Ready);
    assert_eq!(corals[0].path.to_string(), "2-4");
}

#[test]
fn real_images_at_every_block_size_use_exactly_the_protocol_minimum() {
    for name in ["apex_latest_single_ep.bin", "apex_latest_multi_ep.bin"] {
        let Some(image) = shared_image(name) else {
            return;
        };
        for size in [64u16, 256, 4096] {
            let mut config = SimCoralConfig::xhci(4);
            config.transfer_size = size;
            let rig = rig(config);
            let outcomes = run(&rig, &image).unwrap();

            assert_eq!(rig.bus.flashed(0), image.bytes, "{name} at {size}");
            ready_at_2_4(&rig);
            let blocks = image.bytes.len().div_ceil(size as usize);
            let uploads = image.bytes.len() / size as usize + 1;
            assert_eq!(count(&rig, DFU_DNLOAD), blocks + 1, "{name} at {size}");
            assert_eq!(count(&rig, DFU_GETSTATUS), blocks + 2, "{name} at {size}");
            assert_eq!(count(&rig, DFU_UPLOAD), uploads, "{name} at {size}");
            assert_eq!(
                rig.bus.requests().len(),
                2 * blocks + 3 + uploads,
                "nothing else"
            );
            match &outcomes[0] {
                InitOutcome::Initialized { summary, after, .. } => {
                    assert_eq!(summary.bytes, image.bytes.len());
                    assert_eq!(summary.dnload_requests as usize, blocks + 1);
                    assert_eq!(after.path.to_string(), "2-4");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn the_single_ep_image_at_256_is_44_dnloads_45_getstatus_43_uploads() {
    let rig = rig(SimCoralConfig::xhci(4));
    run(&rig, &synthetic(10_783)).unwrap();
    assert_eq!(
        (
            count(&rig, DFU_DNLOAD),
            count(&rig, DFU_GETSTATUS),
            count(&rig, DFU_UPLOAD)
        ),
        (44, 45, 43)
    );
}

#[test]
fn an_already_ready_coral_gets_no_usb_request_and_no_firmware() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Ready);
    let mut load = || -> anyhow::Result<FirmwareImage> { panic!("no firmware needed") };
    let outcomes = init(&bus, clock.as_ref(), &mut load, &opts()).unwrap();
    assert!(matches!(outcomes[0], InitOutcome::AlreadyReady { .. }));
    assert!(bus.requests().is_empty());
}

#[test]
fn no_coral_is_exit_code_3() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    let mut load = || Ok(synthetic(100));
    let err = init(&bus, clock.as_ref(), &mut load, &opts()).unwrap_err();
    assert_eq!(exit_code_of(&err), 3);
    assert!(err.to_string().contains("lsusb"), "{err}");
}

#[test]
fn busy_polls_wait_bw_poll_timeout_and_never_more() {
    let mut config = SimCoralConfig::xhci(4);
    config.faults = SimFaults {
        busy_polls: 2,
        poll_timeout_ms: 5,
        manifest_polls: 1,
        ..SimFaults::default()
    };
    let rig = rig(config);
    let image = synthetic(1000);
    run(&rig, &image).unwrap();
    assert_eq!(rig.bus.flashed(0), image.bytes);
    // 4 blocks × 2 busy polls × 5 ms + 1 manifest poll × 5 ms, plus the 800 ms replug
    // rounded up to the 10 ms polling grid: the sim stalls any request sent early.
    let waited = rig.clock.now();
    assert!(waited >= Duration::from_millis(845), "{waited:?}");
    assert!(
        waited <= Duration::from_millis(860),
        "no sleep when idle: {waited:?}"
    );
    ready_at_2_4(&rig);
}

#[test]
fn recovers_a_boot_loader_left_in_dfu_error_or_mid_transfer() {
    for start in [state::ERROR, state::DNLOAD_IDLE, state::UPLOAD_IDLE] {
        let mut config = SimCoralConfig::xhci(4);
        config.faults.start_state = Some(start);
        let rig = rig(config);
        let image = synthetic(700);
        run(&rig, &image).unwrap();
        assert_eq!(rig.bus.flashed(0), image.bytes, "from state {start}");
        ready_at_2_4(&rig);
    }
}

/// Run with `faults`, expect an error with `exit` and `text`, then clear the
/// faults (replugging when the device is gone) and expect a clean rerun.
fn fails_then_rerun_succeeds(faults: SimFaults, exit: u8, text: &str) {
    let mut config = SimCoralConfig::xhci(4);
    config.faults = faults;
    let rig = rig(config);
    let image = synthetic(3000);
    let err = run(&rig, &image).unwrap_err();
    let message = format!("{err:#}");
    assert_eq!(exit_code_of(&err), exit, "{message}");
    assert!(message.contains(text), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");

    rig.bus.set_faults(0, SimFaults::default());
    if rig.bus.list_corals().unwrap().is_empty() {
        rig.bus.replug(0);
    }
    let corals = rig.bus.list_corals().unwrap();
    if corals[0].state == CoralState::Uninitialized {
        run(&rig, &image).unwrap();
    }
    assert_eq!(rig.bus.flashed(0), image.bytes);
    ready_at_2_4(&rig);
}

#[test]
fn stall_at_a_block() {
    fails_then_rerun_succeeds(
        SimFaults {
            stall_at_block: Some(5),
            ..Default::default()
        },
        5,
        "DNLOAD block 6 of 12",
    );
}

#[test]
fn error_status_at_a_block_names_state_and_status() {
    fails_then_rerun_succeeds(
        SimFaults {
            error_at_block: Some((3, status::ERR_WRITE)),
            ..Default::default()
        },
        5,
        "state dfuERROR, status errWRITE",
    );
}

#[test]
fn device_gone_mid_transfer() {
    fails_then_rerun_succeeds(
        SimFaults {
            vanish_at_block: Some(7),
            ..Default::default()
        },
        5,
        "disappeared during the firmware upload",
    );
}

#[test]
fn no_re_enumeration_times_out() {
    fails_then_rerun_succeeds(
        SimFaults {
            never_reenumerate: true,
            ..Default::default()
        },
        6,
        "did not come back as 18d1:9302 within 10 s",
    );
}

#[test]
fn re_enumerating_as_the_boot_loader_again() {
    fails_then_rerun_succeeds(
        SimFaults {
            reenumerate_as_bootloader: true,
            ..Default::default()
        },
        5,
        "came back as 1a6e:089a again",
    );
}

#[test]
fn corrupted_read_back_is_a_verification_failure() {
    fails_then_rerun_succeeds(
        SimFaults {
            corrupt_readback_at: Some(1234),
            ..Default::default()
        },
        5,
        "differs from the image at byte 1234",
    );
}

#[test]
fn permission_denied_and_busy_are_explained() {
    fails_then_rerun_succeeds(
        SimFaults {
            open_error: Some(UsbError::Access),
            ..Default::default()
        },
        5,
        "run coral as root",
    );
    fails_then_rerun_succeeds(
        SimFaults {
            open_error: Some(UsbError::Busy),
            ..Default::default()
        },
        5,
        "coral detach",
    );
}

#[test]
fn extra_read_back_bytes_are_fine() {
    let mut config = SimCoralConfig::xhci(4);
    config.faults.extra_readback = 512;
    let rig = rig(config);
    run(&rig, &synthetic(1024)).unwrap();
    ready_at_2_4(&rig);
}

#[test]
fn two_corals_are_both_initialized_and_device_selects_one() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Uninitialized);
    bus.add_coral(SimCoralConfig::xhci(3), CoralState::Uninitialized);
    let image = synthetic(900);
    let mut load = || Ok(image.clone());
    let only = InitOptions {
        device: Some("1-3".into()),
        ..opts()
    };
    let outcomes = init(&bus, clock.as_ref(), &mut load, &only).unwrap();
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].ready_device().path, PortPath::new(2, vec![3]));
    assert!(bus.flashed(0).is_empty(), "the other Coral untouched");

    let outcomes = init(&bus, clock.as_ref(), &mut load, &opts()).unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(bus
        .list_corals()
        .unwrap()
        .iter()
        .all(|c| c.state == CoralState::Ready));
}

#[test]
fn force_reflashes_a_ready_coral_through_dfu_detach() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Ready);
    let image = synthetic(2048);
    let mut load = || Ok(image.clone());
    let force = InitOptions {
        force: true,
        ..opts()
    };
    let outcomes = init(&bus, clock.as_ref(), &mut load, &force).unwrap();
    assert!(matches!(outcomes[0], InitOutcome::Initialized { .. }));
    assert_eq!(bus.requests()[0].request, 0, "DFU_DETACH first");
    assert_eq!(bus.flashed(0), image.bytes);
    assert_eq!(bus.list_corals().unwrap()[0].state, CoralState::Ready);
}

//! `coral init` against the in-process simulated Coral: the DFU host's
//! protocol (exact requests), both real images, block sizes, every fault
//! knob with its error, and a rerun that succeeds after each failure.

mod support;

use coral::clock::{Clock, VirtualClock};
use coral::dfu::{state, status, DFU_ABORT, DFU_DNLOAD, DFU_GETSTATUS, DFU_UPLOAD};
use coral::error::{exit_code_of, next_step_of, NextStep};
use coral::firmware::{FirmwareImage, FirmwareSource};
use coral::ops::init::{init, wait_for_coral, InitOptions, InitOutcome};
use coral::usb::{CoralState, PortPath, UsbBus, UsbError};
use coral_testkit::device::{SimBus, SimCoralConfig, SimFaults};
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
    let path = support::shared_firmware(name)?;
    Some(image_of(
        std::fs::read(path).expect("read the shared image"),
    ))
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
        "is in use (passed through to a VM?)",
    );
    let mut config = SimCoralConfig::xhci(4);
    config.faults = SimFaults {
        open_error: Some(UsbError::Busy),
        ..Default::default()
    };
    let err = run(&rig(config), &synthetic(3000)).unwrap_err();
    assert_eq!(
        next_step_of(&err),
        Some(&NextStep::FindHolderAndDetach),
        "the next step finds the VM holding it: {err:#}"
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

// --- The Coral as real hosts show it (issue 9) --------------------------------

fn init_with(
    bus: &SimBus,
    clock: &VirtualClock,
    opts: &InitOptions,
    image: &FirmwareImage,
) -> anyhow::Result<Vec<InitOutcome>> {
    let mut load = || Ok(image.clone());
    init(bus, clock, &mut load, opts)
}

fn paths(outcome: &InitOutcome) -> (String, String) {
    match outcome {
        InitOutcome::Initialized { before, after, .. } => {
            (before.path.to_string(), after.path.to_string())
        }
        other => panic!("not initialized: {other:?}"),
    }
}

#[test]
fn an_unrelated_ready_coral_on_another_controller_is_not_the_one_that_came_back() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Uninitialized);
    // Another controller (buses 3 and 4), its Coral ready at 4-4 all along.
    bus.add_coral(SimCoralConfig::at("3-4", "4-4"), CoralState::Ready);
    let image = synthetic(2000);
    let only = InitOptions {
        device: Some("1-4".into()),
        ..opts()
    };
    let outcomes = init_with(&bus, &clock, &only, &image).unwrap();
    assert_eq!(paths(&outcomes[0]), ("1-4".into(), "2-4".into()));
    assert_eq!(bus.flashed(0), image.bytes);
    assert!(bus.flashed(1).is_empty(), "the other Coral untouched");
}

#[test]
fn peer_ports_with_different_numbers_are_the_same_physical_port() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    // This chipset's USB 2 port 5 is the SuperSpeed bus's port 3.
    bus.add_coral(SimCoralConfig::at("1-5", "2-3"), CoralState::Uninitialized);
    let image = synthetic(2000);
    let outcomes = init_with(&bus, &clock, &opts(), &image).unwrap();
    assert_eq!(paths(&outcomes[0]), ("1-5".into(), "2-3".into()));
    let now = bus.list_corals().unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].state, CoralState::Ready);
    assert_eq!(now[0].path.to_string(), "2-3");
    // And `--device` with either side of that port finds it.
    for device in ["1-5", "2-3"] {
        let again = InitOptions {
            device: Some(device.into()),
            ..opts()
        };
        let outcomes = init_with(&bus, &clock, &again, &image).unwrap();
        assert_eq!(outcomes[0].ready_device().path.to_string(), "2-3");
    }
}

#[test]
fn two_corals_reenumerating_together_each_pair_with_their_own_boot_loader() {
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    // Crossed numbering: 1-5's peer is 2-3 and 1-3's peer is 2-5, so port
    // numbers alone would pair each with the other's ready device.
    bus.add_coral(SimCoralConfig::at("1-5", "2-3"), CoralState::Uninitialized);
    bus.add_coral(SimCoralConfig::at("1-3", "2-5"), CoralState::Uninitialized);
    let image = synthetic(1500);
    let outcomes = init_with(&bus, &clock, &opts(), &image).unwrap();
    let mut pairs: Vec<_> = outcomes.iter().map(paths).collect();
    pairs.sort();
    assert_eq!(
        pairs,
        vec![
            ("1-3".to_string(), "2-5".to_string()),
            ("1-5".to_string(), "2-3".to_string())
        ]
    );
    assert_eq!(bus.flashed(0), image.bytes);
    assert_eq!(bus.flashed(1), image.bytes);
    // Both were reset before either came back: they re-enumerated together.
    assert!(
        clock.now() < Duration::from_millis(1600),
        "waited for both at once, not one after the other: {:?}",
        clock.now()
    );
}

#[test]
fn a_reset_that_fails_with_another_error_still_waits_for_the_ready_device() {
    for error in [
        UsbError::Other("Input/Output Error".into()),
        UsbError::Stall,
        UsbError::Timeout,
    ] {
        let mut config = SimCoralConfig::xhci(4);
        config.faults.reset_error = Some(error.clone());
        let rig = rig(config);
        let image = synthetic(1200);
        let outcomes = run(&rig, &image).unwrap_or_else(|e| panic!("{error:?}: {e:#}"));
        assert_eq!(paths(&outcomes[0]), ("1-4".into(), "2-4".into()));
        ready_at_2_4(&rig);
    }
}

#[test]
fn a_reset_error_and_no_device_is_a_timeout_that_names_the_reset_error() {
    fails_then_rerun_succeeds(
        SimFaults {
            reset_error: Some(UsbError::Other("Input/Output Error".into())),
            never_reenumerate: true,
            ..Default::default()
        },
        6,
        "within 10 s (its USB reset reported: Input/Output Error)",
    );
}

#[test]
fn a_boot_loader_that_comes_back_as_1a6e_089a_fails_as_soon_as_it_is_seen() {
    let mut config = SimCoralConfig::xhci(4);
    config.faults.reenumerate_as_bootloader = true;
    let rig = rig(config);
    let long = InitOptions {
        replug_timeout: Duration::from_secs(300),
        ..opts()
    };
    let err = init_with(&rig.bus, &rig.clock, &long, &synthetic(900)).unwrap_err();
    assert_eq!(exit_code_of(&err), 5, "{err:#}");
    assert!(
        err.to_string().contains("did not take the image"),
        "{err:#}"
    );
    // Seen 800 ms after the reset; the 300 s deadline was not waited out (virtual time).
    assert!(
        rig.clock.now() < Duration::from_secs(300),
        "{:?}",
        rig.clock.now()
    );
}

#[test]
fn garbled_poll_timeouts_are_capped_and_the_download_completes() {
    let mut config = SimCoralConfig::xhci(4);
    config.faults = SimFaults {
        busy_polls: 1,
        poll_timeout_ms: 20,
        manifest_polls: 1,
        garbled_poll_timeout: true,
        ..SimFaults::default()
    };
    let rig = rig(config);
    let image = synthetic(3000);
    run(&rig, &image).unwrap();
    assert_eq!(rig.bus.flashed(0), image.bytes);
    ready_at_2_4(&rig);
    // 13 waits for 0xFFFFFF ms (4.6 hours each) were capped (virtual time).
    assert!(
        rig.clock.now() < Duration::from_secs(60),
        "{:?}",
        rig.clock.now()
    );
}

#[test]
fn a_download_that_outlasts_its_deadline_fails_and_the_rerun_recovers() {
    // 12 blocks, each busy three times 900 ms: longer than the 30 s download deadline.
    fails_then_rerun_succeeds(
        SimFaults {
            busy_polls: 3,
            poll_timeout_ms: 900,
            ..Default::default()
        },
        5,
        "the download did not finish within 30 s",
    );
}

#[test]
fn an_endless_read_back_stops_after_the_image_and_one_block() {
    let mut config = SimCoralConfig::xhci(4);
    config.faults.endless_upload = true;
    let rig = rig(config);
    let image = synthetic(3000);
    run(&rig, &image).unwrap();
    assert_eq!(count(&rig, DFU_UPLOAD), 3000 / 256 + 1);
    assert_eq!(count(&rig, DFU_ABORT), 1, "the upload ended with ABORT");
    ready_at_2_4(&rig);
}

#[test]
fn a_short_out_transfer_is_an_error() {
    fails_then_rerun_succeeds(
        SimFaults {
            short_write_at_block: Some(2),
            ..Default::default()
        },
        5,
        "DNLOAD block 3 of 12: the device took only 128 of 256 bytes",
    );
}

#[test]
fn a_boot_loader_left_busy_or_manifesting_is_waited_out_as_dfu_1_1_says() {
    for (start, faults) in [
        (
            state::DNLOAD_SYNC,
            SimFaults {
                busy_polls: 2,
                poll_timeout_ms: 50,
                ..Default::default()
            },
        ),
        (
            state::MANIFEST_SYNC,
            SimFaults {
                manifest_polls: 2,
                poll_timeout_ms: 50,
                ..Default::default()
            },
        ),
    ] {
        let mut config = SimCoralConfig::xhci(4);
        config.faults = SimFaults {
            start_state: Some(start),
            ..faults
        };
        let rig = rig(config);
        let image = synthetic(700);
        run(&rig, &image).unwrap_or_else(|e| panic!("from state {start}: {e:#}"));
        assert_eq!(rig.bus.flashed(0), image.bytes, "from state {start}");
        ready_at_2_4(&rig);
    }
}

#[test]
fn a_clrstatus_that_does_not_clear_is_caught_before_any_download() {
    let mut config = SimCoralConfig::xhci(4);
    config.faults.start_state = Some(state::ERROR);
    config.faults.sticky_error = Some(1);
    let rig = rig(config);
    let err = run(&rig, &synthetic(700)).unwrap_err();
    assert_eq!(exit_code_of(&err), 5, "{err:#}");
    assert!(
        err.to_string().contains(
            "clearing dfuERROR (CLRSTATUS): device reports state dfuERROR, status errTARGET"
        ),
        "{err:#}"
    );
    assert_eq!(count(&rig, DFU_DNLOAD), 0, "nothing sent into dfuERROR");
}

#[test]
fn the_simulated_boot_loader_stalls_what_dfu_1_1_forbids() {
    use coral::dfu::{DFU_ABORT, DFU_GETSTATE, REQUEST_IN, REQUEST_OUT};
    let forbidden_abort = |manifest: bool| {
        let rig = rig(SimCoralConfig::xhci(4));
        let device = rig.bus.list_corals().unwrap().remove(0);
        let mut t = rig.bus.open(&device).unwrap();
        t.control_out(REQUEST_OUT, DFU_DNLOAD, 0, 0, &[1; 16])
            .unwrap();
        if manifest {
            let mut status = [0u8; 6];
            t.control_in(REQUEST_IN, DFU_GETSTATUS, 0, 0, &mut status)
                .unwrap();
            t.control_out(REQUEST_OUT, DFU_DNLOAD, 1, 0, &[]).unwrap();
        }
        let mut st = [0u8; 1];
        t.control_in(REQUEST_IN, DFU_GETSTATE, 0, 0, &mut st)
            .unwrap();
        let expected = if manifest {
            state::MANIFEST_SYNC
        } else {
            state::DNLOAD_SYNC
        };
        assert_eq!(st[0], expected);
        assert_eq!(
            t.control_out(REQUEST_OUT, DFU_ABORT, 0, 0, &[]),
            Err(UsbError::Stall),
            "ABORT in {}",
            coral::dfu::state_name(expected)
        );
        let mut status = [0u8; 6];
        t.control_in(REQUEST_IN, DFU_GETSTATUS, 0, 0, &mut status)
            .unwrap();
        assert_eq!(
            (status[4], status[0]),
            (state::ERROR, status::ERR_STALLEDPKT)
        );
    };
    forbidden_abort(false);
    forbidden_abort(true);

    // Anything before bwPollTimeout has passed in dfuDNBUSY stalls too.
    let mut config = SimCoralConfig::xhci(4);
    config.faults.busy_polls = 1;
    config.faults.poll_timeout_ms = 100;
    let rig = rig(config);
    let device = rig.bus.list_corals().unwrap().remove(0);
    let mut t = rig.bus.open(&device).unwrap();
    t.control_out(REQUEST_OUT, DFU_DNLOAD, 0, 0, &[1; 16])
        .unwrap();
    let mut status = [0u8; 6];
    t.control_in(REQUEST_IN, DFU_GETSTATUS, 0, 0, &mut status)
        .unwrap();
    assert_eq!(status[4], state::DNBUSY);
    assert_eq!(
        t.control_in(REQUEST_IN, DFU_GETSTATUS, 0, 0, &mut status),
        Err(UsbError::Stall)
    );
}

#[test]
fn a_boot_loader_that_appears_late_is_waited_for_only_when_asked() {
    let mut config = SimCoralConfig::xhci(4);
    config.appears_at = Duration::from_secs(3);
    let rig = rig(config);
    let image = synthetic(800);
    let err = run(&rig, &image).unwrap_err();
    assert_eq!(exit_code_of(&err), 3, "without --wait-device: at once");
    assert_eq!(rig.clock.now(), Duration::ZERO);

    let waiting = InitOptions {
        wait_device: Duration::from_secs(20),
        ..opts()
    };
    let outcomes = init_with(&rig.bus, &rig.clock, &waiting, &image).unwrap();
    assert_eq!(paths(&outcomes[0]), ("1-4".into(), "2-4".into()));
    assert_eq!(rig.bus.flashed(0), image.bytes);

    // The boot path's own wait, through the function `coral up` uses.
    let clock = Rc::new(VirtualClock::new());
    let bus = SimBus::new(clock.clone());
    let mut late = SimCoralConfig::xhci(2);
    late.appears_at = Duration::from_secs(5);
    bus.add_coral(late, CoralState::Uninitialized);
    let found = wait_for_coral(&bus, clock.as_ref(), None, Duration::from_secs(20)).unwrap();
    assert_eq!(found.path.to_string(), "1-2");
    let err =
        wait_for_coral(&bus, clock.as_ref(), Some("1-7"), Duration::from_secs(2)).unwrap_err();
    assert_eq!(exit_code_of(&err), 3);
    assert!(err.to_string().contains("(waited 2 s)"), "{err}");
}

#[test]
fn a_missing_prerequisite_fails_on_ci_and_is_counted_locally() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("skipped.log");
    support::skip_with(false, Some(&log), "t::one", "umockdev is not installed");
    support::skip_with(
        false,
        Some(&log),
        "t::two",
        "../shared/firmware/x.bin is absent",
    );
    let on_ci = std::panic::catch_unwind(|| {
        support::skip_with(true, Some(&log), "t::three", "dfu-util is not installed")
    });
    assert!(
        on_ci.is_err(),
        "CI=true: a missing prerequisite fails the test"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "t::one: umockdev is not installed\nt::two: ../shared/firmware/x.bin is absent\n"
    );
}

//! `coral up` against the in-process simulated Coral and XAPI pool: the
//! power-loss scenarios of the issue, asserting device state, XAPI records
//! and the VM power history.

mod support;

use coral::clock::VirtualClock;
use coral::firmware::{FirmwareImage, FirmwareSource};
use coral::ops::attach::AttachOptions;
use coral::ops::init::InitOutcome;
use coral::ops::up::{up, UpOptions, UpReport};
use coral::sim::coral::{SimBus, SimCoralConfig};
use coral::sim::host::SimulatedHost;
use coral::sim::xapi::{PowerState, World, WorldConfig};
use coral::usb::CoralState;
use coral::xe::client::XeClient;
use std::rc::Rc;
use std::time::Duration;
use support::READ_COMMANDS;

fn image() -> FirmwareImage {
    let bytes: Vec<u8> = (0..10_783u32).map(|i| (i * 7 % 251) as u8).collect();
    FirmwareImage {
        sha256: "test".into(),
        bytes,
        source: FirmwareSource::Flag("test.bin".into()),
        known_name: Some("apex_latest_single_ep.bin".into()),
    }
}

struct Scenario {
    host: SimulatedHost,
    vm_uuid: String,
}

/// One host, a Coral on xHCI port 4 in `coral_state`, VM `frigate` in `power`.
fn scenario(coral_state: CoralState, power: PowerState) -> Scenario {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    bus.add_coral(SimCoralConfig::xhci(4), coral_state);
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-1");
    let resident = (power == PowerState::Running).then_some(host_uuid.as_str());
    let vm_uuid = world.add_vm("frigate", power, resident);
    Scenario {
        host: SimulatedHost::from_parts(clock, bus, world, host_uuid),
        vm_uuid,
    }
}

fn options(restart: bool, dry_run: bool) -> UpOptions {
    UpOptions {
        replug_timeout: Duration::from_secs(10),
        attach: AttachOptions {
            vm: "frigate".into(),
            device: None,
            start: false,
            restart,
            force_shutdown: false,
            shutdown_timeout: Duration::from_secs(180),
            scan_timeout: Duration::from_secs(30),
        },
        dry_run,
        wait_device: Duration::ZERO,
    }
}

fn run_up(s: &Scenario, opts: &UpOptions, loads: &mut u32) -> anyhow::Result<UpReport> {
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), opts.dry_run);
    let mut load = || {
        *loads += 1;
        Ok(image())
    };
    up(s.host.bus(), &xe, s.host.clock(), &mut load, opts)
}

/// The one VUSB of the VM, checked to link the group of the ready Coral's PUSB.
fn vusb_on_ready_group(world: &World, vm_uuid: &str) -> coral::sim::xapi::Vusb {
    let vusbs: Vec<_> = world
        .vusbs
        .iter()
        .filter(|v| v.vm_uuid == vm_uuid)
        .collect();
    assert_eq!(
        vusbs.len(),
        1,
        "exactly one VUSB for the VM: {:?}",
        world.vusbs
    );
    let pusb = world
        .pusbs
        .iter()
        .find(|p| p.device.path == "2-4" && p.device.product_id == "9302")
        .expect("XAPI lists the ready Coral at 2-4");
    assert!(pusb.passthrough_enabled, "passthrough enabled");
    assert_eq!(vusbs[0].usb_group_uuid, pusb.usb_group_uuid);
    vusbs[0].clone()
}

#[test]
fn power_loss_with_the_vm_halted_needs_no_power_transition() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let mut loads = 0;
    let report = run_up(&s, &options(false, false), &mut loads).unwrap();

    assert!(matches!(report.init, Some(InitOutcome::Initialized { .. })));
    assert_eq!(loads, 1);
    let corals = s.host.bus().list_corals().unwrap();
    assert_eq!(corals.len(), 1);
    assert_eq!(
        (corals[0].path.to_string(), corals[0].state),
        ("2-4".into(), CoralState::Ready)
    );

    let world = s.host.world();
    let world = world.borrow();
    vusb_on_ready_group(&world, &s.vm_uuid);
    assert!(world.power_history.is_empty(), "{:?}", world.power_history);
    assert!(
        !world.pusbs.iter().any(|p| p.device.product_id == "089a"),
        "the boot loader's PUSB is gone once XAPI rescanned"
    );
    assert!(
        report.to_string().starts_with("up: firmware uploaded"),
        "{report}"
    );
}

#[test]
fn power_loss_with_the_vm_running_and_restart_restarts_it_exactly_once() {
    let s = scenario(CoralState::Uninitialized, PowerState::Running);
    let mut loads = 0;
    run_up(&s, &options(true, false), &mut loads).unwrap();

    let world = s.host.world();
    let world = world.borrow();
    let vusb = vusb_on_ready_group(&world, &s.vm_uuid);
    assert!(vusb.currently_attached, "attached at the VM's start");
    let transitions: Vec<_> = world.power_history.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        transitions,
        vec![
            (PowerState::Running, PowerState::Halted),
            (PowerState::Halted, PowerState::Running)
        ]
    );
    let shutdowns = world
        .calls
        .iter()
        .filter(|c| c.args[0] == "vm-shutdown")
        .count();
    assert_eq!(shutdowns, 1);
    assert!(
        world
            .calls
            .iter()
            .all(|c| !c.args.iter().any(|a| a == "force=true")),
        "never a hard power-off"
    );
}

#[test]
fn power_loss_with_the_vm_running_without_restart_leaves_it_running() {
    let s = scenario(CoralState::Uninitialized, PowerState::Running);
    let mut loads = 0;
    let report = run_up(&s, &options(false, false), &mut loads).unwrap();

    let world = s.host.world();
    let world = world.borrow();
    let vusb = vusb_on_ready_group(&world, &s.vm_uuid);
    assert!(!vusb.currently_attached, "no USB hot plug in XAPI");
    assert!(world.power_history.is_empty());
    let text = report.attach.expect("attach ran").to_string();
    assert!(
        text.contains("--restart"),
        "says how to restart now: {text}"
    );
}

#[test]
fn steady_state_changes_nothing_and_touches_no_usb() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let mut loads = 0;
    let mut start = options(false, false);
    start.attach.start = true;
    run_up(&s, &start, &mut loads).unwrap();
    let calls_before = s.host.world().borrow().calls.len();
    let history_before = s.host.world().borrow().power_history.clone();
    let clock_before = s.host.clock().now();

    let report = run_up(&s, &options(false, false), &mut loads).unwrap();

    assert_eq!(loads, 1, "no firmware needed in the steady state");
    assert!(report.init.is_none());
    assert!(!report.attach.as_ref().unwrap().changed);
    let world = s.host.world();
    let world = world.borrow();
    let calls = &world.calls[calls_before..];
    assert!(
        calls.len() <= 4,
        "steady state costs at most 4 xe calls: {calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| READ_COMMANDS.contains(&c.args[0].as_str())),
        "no writes: {calls:?}"
    );
    assert_eq!(world.power_history, history_before);
    assert!(report.to_string().contains("nothing to do"), "{report}");
    assert!(s.host.clock().now() - clock_before < Duration::from_secs(1));
}

#[test]
fn dry_run_verifies_the_firmware_and_changes_nothing() {
    let s = scenario(CoralState::Uninitialized, PowerState::Running);
    let mut loads = 0;
    let report = run_up(&s, &options(true, true), &mut loads).unwrap();

    assert_eq!(loads, 1, "the image is checked");
    assert!(report.attach.is_none());
    let corals = s.host.bus().list_corals().unwrap();
    assert_eq!(corals[0].state, CoralState::Uninitialized);
    let world = s.host.world();
    let world = world.borrow();
    assert!(world.vusbs.is_empty());
    assert!(world.power_history.is_empty());
}

#[test]
fn the_built_in_simulation_recovers_from_power_loss() {
    let host = SimulatedHost::new(CoralState::Uninitialized);
    let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false);
    let mut load = || Ok(image());
    let report = up(
        host.bus(),
        &xe,
        host.clock(),
        &mut load,
        &options(true, false),
    )
    .unwrap();
    assert!(matches!(report.init, Some(InitOutcome::Initialized { .. })));
    let world = host.world();
    let world = world.borrow();
    assert_eq!(world.vusbs.len(), 1);
    assert!(world.vusbs[0].currently_attached);
    assert_eq!(world.power_history.len(), 2);
}

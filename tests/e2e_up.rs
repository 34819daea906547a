//! `coral up` end to end: the emulated Coral after a power loss, a fake
//! XAPI whose asynchronous scan follows the emulated bus (the boot loader's
//! PUSB, group and VUSB vanish; a new 18d1:9302 PUSB and group appear), and
//! the VM power history.

mod support;

use coral_testkit::xapi::{
    coral_bootloader_device, coral_ready_device, Fault, FaultKind, GuestShutdown, OutageKind,
    PowerState, SimState, World, WorldConfig,
};
use support::*;

fn power_loss(power: PowerState) -> (FakeXapi, String, String) {
    power_loss_with(fast_config(), power)
}

fn power_loss_with(config: WorldConfig, power: PowerState) -> (FakeXapi, String, String) {
    FakeXapi::with_vm(config, "frigate", power, coral_bootloader_device("1-4"))
}

/// `coral up --vm frigate <args> --firmware <the shared image>`.
fn up(xapi: &FakeXapi, emulator: &[&str], args: &[&str]) -> Run {
    let fw = shared_firmware("apex_latest_single_ep.bin").expect("checked by the caller");
    let fw = fw.display().to_string();
    let mut command = vec!["up", "--vm", "frigate"];
    command.extend(args);
    command.extend(["--firmware", fw.as_str()]);
    xapi.run(emulator, &command)
}

fn no_bootloader_records(world: &World, host: &str) {
    assert!(
        !world
            .pusbs
            .iter()
            .any(|p| p.host_uuid == host && p.device.product_id == "089a"),
        "XAPI's rescan removed the boot loader's PUSB"
    );
}

#[test]
fn power_loss_with_the_vm_halted_needs_zero_power_transitions() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (xapi, host, vm) = power_loss(PowerState::Halted);
    let run = up(&xapi, &[], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, false)]
    );
    assert!(world.power_history.is_empty(), "{:?}", world.power_history);
    no_bootloader_records(&world, &host);
    let summary = run.stdout.lines().last().unwrap_or_default();
    assert!(
        summary
            .starts_with("up: firmware uploaded, Coral ready at 2-4; passed through to the VM ("),
        "{}",
        run.stdout
    );
}

#[test]
fn vm_running_with_restart_gets_exactly_one_clean_restart() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (xapi, host, vm) = power_loss(PowerState::Running);
    let run = up(&xapi, &[], &["--restart"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, true)]
    );
    assert_eq!(power_transitions(&world), ONE_RESTART);
}

#[test]
fn vm_running_without_restart_is_left_running_with_the_vusb_pending() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (xapi, host, vm) = power_loss(PowerState::Running);
    let run = up(&xapi, &[], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, false)]
    );
    assert!(world.power_history.is_empty());
    assert!(
        run.stdout.contains("arrives at its next start"),
        "{}",
        run.stdout
    );
}

#[test]
fn steady_state_touches_no_usb_and_writes_nothing() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (xapi, host, vm) = power_loss(PowerState::Halted);
    assert_eq!(up(&xapi, &[], &["--start"]).status, Some(0));
    let before = xapi.world().calls.len();
    let run = up(&xapi, &["--state", "ready"], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(
        run.requests().is_empty(),
        "no USB request: {:?}",
        run.requests()
    );
    let world = xapi.world();
    let calls = &world.calls[before..];
    assert!(calls.len() <= 4, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| READ_COMMANDS.contains(&c.args[0].as_str())),
        "{calls:?}"
    );
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, true)]
    );
    assert!(run.stdout.contains("up: nothing to do"), "{}", run.stdout);
}

#[test]
fn two_concurrent_runs_serialize_on_the_lock() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (xapi, host, vm) = power_loss(PowerState::Halted);
    let fw = shared_firmware("apex_latest_single_ep.bin").unwrap();
    let coral = coral_bin().display().to_string();
    let script = format!(
        "'{coral}' up --vm frigate --firmware '{fw}' > a.out 2>&1 & a=$!; '{coral}' up --vm frigate --firmware '{fw}' > b.out 2>&1; b=$?; wait $a; echo \"a=$? b=$b\"; cat a.out b.out >&2",
        fw = fw.display()
    );
    let mut emulator = xapi.bus_args();
    emulator.push("--reenumerate-ms".into());
    emulator.push("300".into());
    let run = emulate(
        &emulator,
        &["/bin/sh".into(), "-c".into(), script],
        &xapi.env(),
    );
    assert!(
        run.stdout.contains("a=0 b=0"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains("waiting for another coral run"),
        "{}",
        run.stderr
    );
    assert_eq!(run.count(0x21, 1), 44, "the firmware was uploaded once");
    assert_eq!(
        vusbs_on_ready_group(&xapi.world(), &host, &vm, "2-4"),
        vec![(true, false)],
        "exactly one VUSB"
    );
}

#[test]
fn a_device_vanishing_during_upload_changes_nothing_in_xapi() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (xapi, host, vm) = power_loss(PowerState::Running);
    let run = up(&xapi, &["--vanish-at-block", "10"], &["--restart"]);
    assert_eq!(run.status, Some(5), "{}", run.stderr);
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    let world = xapi.world();
    assert!(world.vusbs.is_empty());
    assert!(world.power_history.is_empty());
    assert_eq!(world.vm(&vm).unwrap().power_state, PowerState::Running);
    let _ = host;
}

#[test]
fn an_xapi_scan_slower_than_the_deadline_is_a_timeout_with_nothing_changed() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let mut config = fast_config();
    config.scan_delay_ms = 60_000;
    let (xapi, host, vm) = power_loss_with(config, PowerState::Running);
    let run = up(&xapi, &[], &["--restart", "--scan-timeout", "1"]);
    assert_eq!(run.status, Some(6), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("XAPI did not list the Coral at 2-4 within 1 s"),
        "{}",
        run.stderr
    );
    let world = xapi.world();
    assert!(vusbs_on_ready_group(&world, &host, &vm, "2-4").is_empty());
    assert!(world.power_history.is_empty());
    let scans = world
        .calls
        .iter()
        .filter(|c| c.args[0] == "pusb-scan")
        .count();
    assert_eq!(scans, 1, "one scan kick, then polling");
}

#[test]
fn a_shutdown_that_is_never_acknowledged_leaves_the_vm_running() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (mut world, host, vm) = frigate_pool(PowerState::Running, coral_bootloader_device("1-4"));
    world.vm_mut(&vm).unwrap().guest_shutdown = GuestShutdown::NeverAcknowledges;
    let xapi = FakeXapi::new(world, &host);
    let run = up(&xapi, &[], &["--restart"]);
    assert_eq!(run.status, Some(8), "{}", run.stderr);
    assert!(
        run.stderr.contains("did not shut down cleanly"),
        "{}",
        run.stderr
    );
    assert_vm_left_running(&xapi.world(), &host, &vm);

    // The rerun, with a guest that cooperates now, converges.
    let mut state = SimState::load(&xapi.state).unwrap();
    state.world.vm_mut(&vm).unwrap().guest_shutdown = GuestShutdown::Cooperates;
    state.save(&xapi.state).unwrap();
    let run = up(&xapi, &["--state", "ready"], &["--restart"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        vusbs_on_ready_group(&xapi.world(), &host, &vm, "2-4"),
        vec![(true, true)]
    );
}

#[test]
fn a_start_that_fails_with_the_coral_starts_the_vm_without_it() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (mut world, host, vm) = frigate_pool(PowerState::Running, coral_ready_device("2-4"));
    // Twice: a single failure is retried with the Coral.
    for nth in [1, 2] {
        world.faults.push(Fault::nth(
            "vm-start",
            nth,
            FaultKind::fail("INTERNAL_ERROR", &["usb reset failed"]),
        ));
    }
    let xapi = FakeXapi::new(world, &host);
    let run = up(&xapi, &["--state", "ready"], &["--restart"]);
    assert_eq!(run.status, Some(7), "{}", run.stderr);
    assert!(
        run.stderr.contains("started again without it"),
        "{}",
        run.stderr
    );
    let world = xapi.world();
    assert_eq!(
        world.vm(&vm).unwrap().power_state,
        PowerState::Running,
        "never left down"
    );
    assert!(world.vusbs.is_empty(), "no stray VUSB");
}

#[test]
fn up_at_boot_waits_while_xapi_is_down_then_starting() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (mut world, host, vm) = frigate_pool(PowerState::Halted, coral_bootloader_device("1-4"));
    world.add_outage(0, 1_500, OutageKind::Refused);
    world.add_outage(1_500, 2_500, OutageKind::StillBooting);
    let xapi = FakeXapi::new(world, &host);
    let run = up(&xapi, &[], &[]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stderr.matches("xapi is not available yet").count(),
        1,
        "logged once: {}",
        run.stderr
    );
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, false)]
    );
}

//! `coral attach` / `detach` / `status` end to end: the built binary, the
//! emulated ready Coral and a fake `xe` on PATH; asserts the final XAPI
//! records, the VM power history and the xe calls made.

mod support;

use coral_testkit::xapi::{coral_ready_device, Fault, FaultKind, OutageKind, PowerState};
use support::*;

fn ready_pool(name: &str, power: PowerState) -> (FakeXapi, String, String) {
    FakeXapi::with_vm(fast_config(), name, power, coral_ready_device("2-4"))
}

/// `coral <args>` with the emulated Coral ready.
fn attach(xapi: &FakeXapi, args: &[&str]) -> Run {
    xapi.run(&["--state", "ready"], args)
}

#[test]
fn attach_to_a_halted_vm_links_the_ready_group_without_power_transitions() {
    if !umockdev_available() {
        return;
    }
    let (xapi, host, vm) = ready_pool("frigate", PowerState::Halted);
    let run = attach(&xapi, &["attach", "--vm", "frigate"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, false)]
    );
    assert!(world
        .pusbs
        .iter()
        .filter(|p| p.host_uuid == host)
        .all(|p| p.passthrough_enabled));
    assert!(
        world
            .pusbs
            .iter()
            .filter(|p| p.host_uuid != host)
            .all(|p| !p.passthrough_enabled),
        "other host untouched"
    );
    assert!(world.power_history.is_empty());
    assert!(world.calls.len() <= 8, "{} xe calls", world.calls.len());
    assert!(
        run.stdout.contains("gets the Coral when it starts"),
        "{}",
        run.stdout
    );

    // Run twice: the second run changes nothing and says so.
    let calls_before = world.calls.len();
    let again = attach(&xapi, &["attach", "--vm", "frigate"]);
    assert_eq!(again.status, Some(0), "{}", again.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4").len(),
        1,
        "no duplicate VUSB"
    );
    assert!(world.calls[calls_before..]
        .iter()
        .all(|c| READ_COMMANDS.contains(&c.args[0].as_str())));
    assert!(
        again.stdout.contains("already has the Coral's VUSB"),
        "{}",
        again.stdout
    );
}

#[test]
fn attach_to_a_running_vm_with_restart_restarts_it_exactly_once() {
    if !umockdev_available() {
        return;
    }
    let (xapi, host, vm) = ready_pool("frigate", PowerState::Running);
    let run = attach(&xapi, &["attach", "--vm", "frigate", "--restart"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, true)]
    );
    assert_eq!(power_transitions(&world), ONE_RESTART);
    assert!(!world
        .calls
        .iter()
        .any(|c| c.args.iter().any(|a| a == "force=true")));

    // Steady state: attached and running → at most 4 calls, no writes.
    let before = world.calls.len();
    let steady = attach(&xapi, &["attach", "--vm", "frigate"]);
    assert_eq!(steady.status, Some(0), "{}", steady.stderr);
    let world = xapi.world();
    let calls = &world.calls[before..];
    assert!(calls.len() <= 4, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| READ_COMMANDS.contains(&c.args[0].as_str())),
        "{calls:?}"
    );
    assert!(steady.stdout.contains("nothing to do"), "{}", steady.stdout);
}

#[test]
fn a_name_with_spaces_quotes_and_shell_characters_is_matched_exactly() {
    if !umockdev_available() {
        return;
    }
    let name = "cam \"front\", $(reboot); ü 'x'";
    let (xapi, host, vm) = ready_pool(name, PowerState::Halted);
    let run = attach(&xapi, &["attach", "--vm", name]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        vusbs_on_ready_group(&xapi.world(), &host, &vm, "2-4").len(),
        1
    );

    let prefix = attach(&xapi, &["attach", "--vm", "cam"]);
    assert_eq!(
        prefix.status,
        Some(8),
        "a prefix never matches: {}",
        prefix.stderr
    );
    assert!(
        prefix.stderr.contains("VM 'cam' not found on this pool"),
        "{}",
        prefix.stderr
    );
}

#[test]
fn a_clean_shutdown_that_hangs_leaves_the_vm_running_and_no_stray_vusb() {
    if !umockdev_available() {
        return;
    }
    let (mut world, host, vm) = frigate_pool(PowerState::Running, coral_ready_device("2-4"));
    world
        .faults
        .push(Fault::every("vm-shutdown", FaultKind::Hang));
    let xapi = FakeXapi::new(world, &host);
    let run = attach(
        &xapi,
        &[
            "attach",
            "--vm",
            "frigate",
            "--restart",
            "--shutdown-timeout",
            "1",
        ],
    );
    assert_eq!(run.status, Some(8), "{}", run.stderr);
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("did not shut down cleanly"),
        "{}",
        run.stderr
    );
    assert_vm_left_running(&xapi.world(), &host, &vm);
}

#[test]
fn detach_unplugs_and_destroys_and_status_shows_each_step() {
    if !umockdev_available() {
        return;
    }
    let (xapi, host, vm) = ready_pool("frigate", PowerState::Running);
    let run = attach(&xapi, &["attach", "--vm", "frigate"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let status = attach(&xapi, &["status", "--json"]);
    assert_eq!(status.status, Some(0), "{}", status.stderr);
    let json: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(json["schema"], 1);
    assert_eq!(json["corals"][0]["path"], "2-4");
    assert_eq!(json["corals"][0]["vm_name"], "frigate");
    assert_eq!(json["corals"][0]["pending_restart"], true);

    let run = attach(&xapi, &["detach", "--vm", "frigate"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(vusbs_on_ready_group(&xapi.world(), &host, &vm, "2-4").is_empty());
    let table = attach(&xapi, &["status"]);
    assert!(
        table.stdout.contains("Coral 2-4: ready"),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.lines().all(|l| l.chars().count() <= 80),
        "{}",
        table.stdout
    );
}

#[test]
fn xe_missing_or_no_inventory_is_exit_7() {
    if !umockdev_available() {
        return;
    }
    let (xapi, _, _) = ready_pool("frigate", PowerState::Halted);
    let attach_frigate = ["attach", "--vm", "frigate"];
    let xe = [("CORAL_XE".to_string(), "/nonexistent/xe".to_string())];
    let run = xapi.run_with_env(&["--state", "ready"], &attach_frigate, &xe);
    assert_eq!(run.status, Some(7), "{}", run.stderr);
    assert!(run.stderr.contains("CORAL_XE"), "{}", run.stderr);

    let inventory = [(
        "CORAL_INVENTORY".to_string(),
        "/nonexistent/inventory".to_string(),
    )];
    let run = xapi.run_with_env(&["--state", "ready"], &attach_frigate, &inventory);
    assert_eq!(run.status, Some(7), "{}", run.stderr);
    assert!(run.stderr.contains("XCP-ng dom0"), "{}", run.stderr);
}

#[test]
fn a_killed_xe_vm_shutdown_goes_on_in_xapi_and_the_vm_is_started_again() {
    if !umockdev_available() {
        return;
    }
    // The guest takes 3 s to halt; coral kills `xe vm-shutdown` after 1 s.
    let mut config = fast_config();
    config.shutdown_ms = 3_000;
    let (world, host, vm) = pool(
        config,
        "frigate",
        PowerState::Running,
        vec![coral_ready_device("2-4")],
    );
    let xapi = FakeXapi::new(world, &host);
    let run = attach(
        &xapi,
        &[
            "attach",
            "--vm",
            "frigate",
            "--restart",
            "--shutdown-timeout",
            "1",
        ],
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let world = xapi.world();
    assert_eq!(power_transitions(&world), ONE_RESTART, "{}", run.stderr);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, true)]
    );
}

#[test]
fn status_while_xapi_is_starting_shows_the_usb_side_and_exits_0() {
    if !umockdev_available() {
        return;
    }
    let (mut world, host, _) = frigate_pool(PowerState::Running, coral_ready_device("2-4"));
    world.add_outage(0, u64::MAX, OutageKind::StillBooting);
    let xapi = FakeXapi::new(world, &host);
    let run = attach(&xapi, &["status", "--json"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect(&run.stdout);
    assert_eq!(json["xapi_available"], false);
    assert_eq!(json["corals"][0]["usb_state"], "ready");
    assert!(run.stderr.contains("XAPI not available"), "{}", run.stderr);
}

/// The emulated ready Coral, first device number `devnum` (a later run of
/// the same host: the Coral re-enumerated in between when it differs).
fn on_host_at(xapi: &FakeXapi, qemu: &[(String, String)], devnum: u32, args: &[&str]) -> Run {
    let devnum = devnum.to_string();
    xapi.run_with_env(&["--state", "ready", "--first-devnum", &devnum], args, qemu)
}

/// The ready Coral's device number at the end of a run.
fn devnum(run: &Run) -> u64 {
    run.result["devices"][0]["devnum"]
        .as_u64()
        .expect("a device")
}

/// status --json: the Coral's `guest_node`.
fn guest_node(run: &Run) -> String {
    let json: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", run.stdout, run.stderr));
    assert_eq!(json["schema"], 1);
    json["corals"][0]["guest_node"]
        .as_str()
        .unwrap_or("null")
        .to_string()
}

/// A Coral that re-enumerated as itself under the running VM (8.3 marks:
/// QEMU's chroot holds the old node): status and doctor say the VM lost it,
/// attach without --restart says it needs one, attach --restart restarts it.
fn lost_then_restarted(version: &str) {
    let (xapi, host, vm) = ready_pool("frigate", PowerState::Running);
    let qemu = xapi.qemu_env(version);
    // The VM gets the Coral at a start, which marks the node for its domain.
    let first = on_host_at(&xapi, &qemu, 5, &["attach", "--vm", "frigate", "--restart"]);
    assert_eq!(first.status, Some(0), "{}", first.stderr);
    assert_eq!(power_transitions(&xapi.world()), ONE_RESTART);
    let given = devnum(&first);
    let status = on_host_at(&xapi, &qemu, given as u32, &["status", "--json"]);
    assert_eq!(guest_node(&status), "given", "{}", status.stderr);

    // Later the Coral is back at the same port as itself with a new number:
    // XAPI's records are unchanged and still attached.
    let records = |w: &coral_testkit::xapi::World| (w.pusbs.clone(), w.vusbs.clone());
    let before = records(&xapi.world());
    let later = given as u32 + 1;
    let status = on_host_at(&xapi, &qemu, later, &["status", "--json"]);
    assert_eq!(guest_node(&status), "lost", "{}", status.stderr);
    let text = on_host_at(&xapi, &qemu, later, &["status"]);
    assert!(
        text.stdout
            .contains("the VM lost its Coral; it needs a restart"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("coral attach --vm"), "{}", text.stdout);
    let doctor = on_host_at(&xapi, &qemu, later, &["doctor", "--json"]);
    let json: serde_json::Value =
        serde_json::from_str(&doctor.stdout).unwrap_or_else(|e| panic!("{e}: {}", doctor.stderr));
    let check = json["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "guest 2-4")
        .unwrap_or_else(|| panic!("no guest check: {json:#}"));
    assert_eq!(check["verdict"], "fail");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("lost its Coral; it needs a restart"),
        "{check}"
    );
    assert_eq!(check["fix"], format!("coral attach --vm {vm} --restart"));

    let told = on_host_at(&xapi, &qemu, later, &["attach", "--vm", "frigate"]);
    assert_eq!(told.status, Some(0), "{}", told.stderr);
    assert!(told.stdout.contains("lost its Coral"), "{}", told.stdout);
    assert!(
        told.stdout
            .contains(&format!("coral attach --vm {vm} --restart")),
        "{}",
        told.stdout
    );
    assert_eq!(
        power_transitions(&xapi.world()),
        ONE_RESTART,
        "no restart without --restart"
    );

    let restarted = on_host_at(
        &xapi,
        &qemu,
        later,
        &["attach", "--vm", "frigate", "--restart"],
    );
    assert_eq!(restarted.status, Some(0), "{}", restarted.stderr);
    let world = xapi.world();
    assert_eq!(
        power_transitions(&world),
        [ONE_RESTART, ONE_RESTART].concat()
    );
    assert_eq!(records(&world).0, before.0, "the same PUSB");
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, true)],
        "the same VUSB, attached"
    );
    let status = on_host_at(&xapi, &qemu, later, &["status", "--json"]);
    assert_eq!(guest_node(&status), "given");
}

#[test]
fn a_coral_that_reenumerated_under_its_vm_is_lost_and_attach_restart_restarts_it_on_8_3() {
    if !umockdev_available() {
        return;
    }
    lost_then_restarted("8.3");
}

#[test]
fn a_coral_that_reenumerated_under_its_vm_is_lost_and_attach_restart_restarts_it_on_8_2() {
    if !umockdev_available() {
        return;
    }
    lost_then_restarted("8.2");
}

#[test]
fn without_any_qemu_mark_the_guest_is_unknown_and_nothing_restarts() {
    if !umockdev_available() {
        return;
    }
    let (xapi, _, _) = ready_pool("frigate", PowerState::Running);
    let first = attach(&xapi, &["attach", "--vm", "frigate", "--restart"]);
    assert_eq!(first.status, Some(0), "{}", first.stderr);
    let again = xapi.run(
        &["--state", "ready", "--first-devnum", "9"],
        &["attach", "--vm", "frigate", "--restart"],
    );
    assert_eq!(again.status, Some(0), "{}", again.stderr);
    assert!(again.stdout.contains("nothing to do"), "{}", again.stdout);
    assert_eq!(power_transitions(&xapi.world()), ONE_RESTART);
    let status = xapi.run(
        &["--state", "ready", "--first-devnum", "9"],
        &["status", "--json"],
    );
    assert_eq!(guest_node(&status), "unknown");
}

#[test]
fn a_start_that_fails_in_xapis_usb_reset_is_retried_then_the_vm_runs_without_the_coral() {
    if !umockdev_available() {
        return;
    }
    // Once: the rescan and second start bring the VM up with the Coral.
    let (xapi, host, vm) = ready_pool("frigate", PowerState::Running);
    let mut state = coral_testkit::xapi::SimState::load(&xapi.state).unwrap();
    state.world.usb_reset_failures = 1;
    state.save(&xapi.state).unwrap();
    let run = attach(&xapi, &["attach", "--vm", "frigate", "--restart"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4"),
        vec![(true, true)]
    );
    assert_eq!(power_transitions(&world), ONE_RESTART);
    let starts = world
        .calls
        .iter()
        .filter(|c| c.args[0] == "vm-start")
        .count();
    assert_eq!(starts, 2);

    // For good: the VM runs again without the Coral, and the fix is named.
    let (xapi, host, vm) = ready_pool("frigate", PowerState::Running);
    let mut state = coral_testkit::xapi::SimState::load(&xapi.state).unwrap();
    state.world.usb_reset_failures = u32::MAX;
    state.save(&xapi.state).unwrap();
    let run = attach(&xapi, &["attach", "--vm", "frigate", "--restart"]);
    assert_eq!(run.status, Some(7), "{}", run.stderr);
    let lines = run.error_lines();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].contains("xcp-ng/xcp#516")
            && lines[0].contains("replug")
            && lines[0].contains(&format!("coral attach --vm {vm} --restart")),
        "{}",
        lines[0]
    );
    let world = xapi.world();
    assert_eq!(world.vm(&vm).unwrap().power_state, PowerState::Running);
    assert!(vusbs_on_ready_group(&world, &host, &vm, "2-4").is_empty());
}

#[test]
fn after_a_power_loss_the_doomed_boot_loader_vusb_does_not_keep_a_vm_with_five_others_from_its_coral(
) {
    if !umockdev_and_firmware_available() {
        return;
    }
    let other = |path: &str, pid: &str| coral_testkit::xapi::SimUsbDevice {
        path: path.into(),
        vendor_id: "0781".into(),
        product_id: pid.into(),
        vendor_desc: "SanDisk Corp.".into(),
        product_desc: String::new(),
        serial: format!("SN-{path}"),
        version: "2.00".into(),
        speed: "480.000".into(),
        interface_classes: vec![0x08],
    };
    let mut present = vec![coral_testkit::xapi::coral_bootloader_device("1-4")];
    present.extend(
        ["1-1", "1-2", "1-3", "3-1", "3-2"]
            .iter()
            .enumerate()
            .map(|(i, p)| other(p, &format!("55{i:02}"))),
    );
    let (mut world, host, vm) = pool(fast_config(), "frigate", PowerState::Halted, present);
    let groups: Vec<String> = world
        .pusbs
        .iter()
        .filter(|p| p.host_uuid == host)
        .map(|p| p.usb_group_uuid.clone())
        .collect();
    assert_eq!(groups.len(), 6);
    for group in groups {
        let uuid = world.new_uuid();
        world.vusbs.push(coral_testkit::xapi::Vusb {
            uuid,
            vm_uuid: vm.clone(),
            usb_group_uuid: group,
            currently_attached: false,
            other_config: Default::default(),
        });
    }
    let xapi = FakeXapi::new(world, &host);
    let fw = shared_firmware("apex_latest_single_ep.bin").expect("checked above");
    let fw = fw.display().to_string();
    let run = xapi.run(&[], &["up", "--vm", "frigate", "--firmware", &fw]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vm, "2-4")
            .iter()
            .filter(|(ready, _)| *ready)
            .count(),
        1,
        "the VM has the ready Coral's VUSB"
    );
    let vm_vusbs = world.vusbs.iter().filter(|v| v.vm_uuid == vm).count();
    assert_eq!(
        vm_vusbs, 6,
        "5 others and the Coral; XAPI deleted the boot loader's"
    );
    assert!(!world.pusbs.iter().any(|p| p.device.product_id == "089a"));
    assert!(world.power_history.is_empty());
}

//! The simulated XAPI pool follows the fact sheet (xapi-usb.md): output
//! formats, errors, scan semantics, VUSB preconditions, no hot plug, timed
//! power operations, pools. The fake `xe` binary keeps it across processes.

use coral_testkit::xapi::{
    coral_bootloader_device, coral_ready_device, Fault, FaultKind, GuestShutdown, Outage,
    OutageKind, PowerState, SimState, World, WorldConfig,
};
use std::time::Duration;

fn args(line: &[&str]) -> Vec<String> {
    line.iter().map(|s| s.to_string()).collect()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn xe(world: &mut World, line: &[&str], at: u64) -> (i32, String, String) {
    let r = world.execute(&args(line), ms(at));
    (r.output.status, r.output.stdout, r.output.stderr)
}

fn one_host() -> (World, String) {
    let mut w = World::new(WorldConfig::default());
    let host = w.add_host("xcp-a");
    (w, host)
}

#[test]
fn human_output_pads_labels_like_real_xe() {
    let (mut w, _) = one_host();
    w.add_vm("homeassistant", PowerState::Running, None);
    let (status, out, _) = xe(
        &mut w,
        &["vm-list", "params=uuid,name-label,power-state"],
        0,
    );
    assert_eq!(status, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("uuid ( RO)           : "), "{out:?}");
    assert_eq!(lines[1], "     name-label ( RW): homeassistant");
    assert_eq!(lines[2], "    power-state ( RO): running");
    assert!(
        out.ends_with("running\n\n\n"),
        "two empty lines after a record: {out:?}"
    );
}

#[test]
fn minimal_escapes_commas_and_prints_an_empty_line_for_nothing() {
    let (mut w, _) = one_host();
    w.add_vm("cam, front", PowerState::Halted, None);
    w.add_vm("back\\yard", PowerState::Halted, None);
    let (_, out, _) = xe(&mut w, &["vm-list", "params=name-label", "--minimal"], 0);
    assert_eq!(out, "cam\\, front,back\\\\yard\n");
    let (status, out, _) = xe(&mut w, &["vm-list", "name-label=nope", "--minimal"], 0);
    assert_eq!((status, out.as_str()), (0, "\n"));
}

#[test]
fn filters_are_exact_and_templates_are_hidden() {
    let (mut w, _) = one_host();
    w.add_vm("frigate", PowerState::Halted, None);
    w.add_vm("frigate-old", PowerState::Halted, None);
    let t = w.add_vm("frigate", PowerState::Halted, None);
    w.vm_mut(&t).unwrap().is_a_template = true;
    let (_, out, _) = xe(&mut w, &["vm-list", "name-label=frigate", "--minimal"], 0);
    assert_eq!(
        out.trim().split(',').count(),
        1,
        "exact, no template: {out}"
    );
}

#[test]
fn a_scan_is_asynchronous_and_replaces_records_on_re_enumeration() {
    let (mut w, host) = one_host();
    let vm = w.add_vm("frigate", PowerState::Halted, None);
    w.set_usb_devices(&host, vec![coral_bootloader_device("1-4")], ms(0));
    w.scan_now(&host);
    let old_group = w.pusbs[0].usb_group_uuid.clone();
    assert_eq!(w.groups[0].name_label, "Group of 1a6e 089a USBs");
    assert!(!w.pusbs[0].passthrough_enabled);
    let (_, vusb, _) = xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={old_group}"),
            &format!("vm-uuid={vm}"),
        ],
        0,
    );
    assert!(!vusb.trim().is_empty());

    // The Coral re-enumerates on the SuperSpeed bus: udev triggers a scan.
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(1_000));
    let (_, out, _) = xe(
        &mut w,
        &["pusb-list", "product-id=9302", "--minimal"],
        1_100,
    );
    assert_eq!(out, "\n", "not visible before the scan completes");
    let (_, out, _) = xe(
        &mut w,
        &["pusb-list", "product-id=9302", "params=path", "--minimal"],
        1_600,
    );
    assert_eq!(out, "2-4\n");
    assert!(w.vusbs.is_empty(), "the old group's VUSB went with it");
    assert!(!w.groups.iter().any(|g| g.uuid == old_group));
    assert_eq!(w.pusbs.len(), 1);
}

#[test]
fn unchanged_devices_keep_their_records_and_hubs_are_never_pusbs() {
    let (mut w, host) = one_host();
    let mut hub = coral_ready_device("2-1");
    hub.interface_classes = vec![0x09];
    w.set_usb_devices(&host, vec![coral_ready_device("2-4"), hub.clone()], ms(0));
    w.scan_now(&host);
    let uuid = w.pusbs[0].uuid.clone();
    w.set_usb_devices(&host, vec![coral_ready_device("2-4"), hub], ms(10));
    w.advance(ms(10_000));
    assert_eq!(w.pusbs.len(), 1);
    assert_eq!(w.pusbs[0].uuid, uuid);
}

#[test]
fn vusb_preconditions_in_xapi_order() {
    let (mut w, host) = one_host();
    let vm = w.add_vm("frigate", PowerState::Running, Some(&host));
    let devices: Vec<_> = (1..=7)
        .map(|p| coral_ready_device(&format!("2-{p}")))
        .collect();
    w.set_usb_devices(&host, devices, ms(0));
    w.scan_now(&host);
    let groups: Vec<String> = w.groups.iter().map(|g| g.uuid.clone()).collect();
    for g in &groups[..6] {
        let (status, _, err) = xe(
            &mut w,
            &[
                "vusb-create",
                &format!("usb-group-uuid={g}"),
                &format!("vm-uuid={vm}"),
            ],
            0,
        );
        assert_eq!(status, 0, "{err}");
    }
    let (status, _, err) = xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={}", groups[6]),
            &format!("vm-uuid={vm}"),
        ],
        0,
    );
    assert_eq!(status, 1);
    assert!(err.starts_with("The VM has too many VUSBs."), "{err}");

    let other = w.add_vm("other", PowerState::Halted, None);
    let (status, _, err) = xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={}", groups[0]),
            &format!("vm-uuid={other}"),
        ],
        0,
    );
    assert_eq!(status, 1);
    assert!(
        err.starts_with("USB_groups are currently restricted to contain no more than one VUSB."),
        "{err}"
    );
    assert!(
        w.vusbs.iter().all(|v| !v.currently_attached),
        "no hot plug into a running VM"
    );
}

#[test]
fn power_operations_take_time_attach_vusbs_and_fail_like_xapi() {
    let (mut w, host) = one_host();
    let vm = w.add_vm("frigate", PowerState::Running, Some(&host));
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(0));
    w.scan_now(&host);
    let group = w.groups[0].uuid.clone();
    xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={group}"),
            &format!("vm-uuid={vm}"),
        ],
        0,
    );

    let r = w.execute(&args(&["vm-shutdown", &format!("uuid={vm}")]), ms(0));
    assert_eq!(r.output.status, 0);
    assert_eq!(r.duration, ms(150 + 5_000));
    let (status, _, err) = xe(&mut w, &["vm-shutdown", &format!("uuid={vm}")], 6_000);
    assert_eq!(status, 1);
    assert!(
        err.contains("appropriate power state")
            && err.contains("expected: running")
            && err.contains("actual: halted"),
        "{err}"
    );
    xe(&mut w, &["vm-start", &format!("uuid={vm}")], 7_000);
    w.advance(ms(20_000));
    assert!(w.vusbs[0].currently_attached, "attached at start");
    let vusb = format!("uuid={}", w.vusbs[0].uuid);
    let (status, _, err) = xe(&mut w, &["vusb-destroy", &vusb], 20_000);
    assert_eq!(status, 1);
    assert!(
        err.starts_with("You attempted an operation that was not allowed."),
        "{err}"
    );
    let transitions: Vec<_> = w.power_history.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        transitions,
        vec![
            (PowerState::Running, PowerState::Halted),
            (PowerState::Halted, PowerState::Running)
        ]
    );

    w.vm_mut(&vm).unwrap().guest_shutdown = GuestShutdown::NeverAcknowledges;
    let r = w.execute(&args(&["vm-shutdown", &format!("uuid={vm}")]), ms(30_000));
    assert_eq!(r.output.status, 1);
    assert_eq!(r.duration, ms(150 + 60_000));
    assert!(r
        .output
        .stderr
        .starts_with("VM didn't acknowledge the need to shutdown."));
    assert_eq!(w.vm(&vm).unwrap().power_state, PowerState::Running);
}

#[test]
fn selectors_and_cli_mistakes_print_xe_texts() {
    let (mut w, _) = one_host();
    w.add_vm("a", PowerState::Halted, None);
    w.add_vm("a", PowerState::Halted, None);
    let (status, _, err) = xe(&mut w, &["vm-start", "vm=zzz"], 0);
    assert_eq!(
        (status, err.as_str()),
        (1, "Error: No matching VMs found\n")
    );
    let (_, _, err) = xe(&mut w, &["vm-start", "name-label=a"], 0);
    assert_eq!(
        err,
        "Error: Multiple matches VMs found. --multiple required to complete the operation\n"
    );
    let (_, _, err) = xe(&mut w, &["vm-frobnicate"], 0);
    assert!(err.starts_with("Unknown command: vm-frobnicate"));
    let (_, _, err) = xe(&mut w, &["vusb-create", "vm-uuid=x"], 0);
    assert!(err.starts_with("Required parameter not found: usb-group-uuid"));
    let (status, _, err) = xe(
        &mut w,
        &["pusb-param-set", "uuid=x", "passthrough-enabled=yes"],
        0,
    );
    assert_eq!(status, 1);
    assert!(err.contains("'true' or 'false'"), "{err}");
}

#[test]
fn faults_fail_the_nth_call_or_hang() {
    let (mut w, _) = one_host();
    w.faults.push(Fault::nth(
        "vm-list",
        2,
        FaultKind::fail("SOMETHING_ODD", &["x", "y"]),
    ));
    w.faults.push(Fault::every("host-list", FaultKind::Hang));
    assert_eq!(xe(&mut w, &["vm-list"], 0).0, 0);
    let (status, _, err) = xe(&mut w, &["vm-list"], 0);
    assert_eq!(
        (status, err.as_str()),
        (1, "Error code: SOMETHING_ODD\nError parameters: x, y\n")
    );
    assert_eq!(xe(&mut w, &["vm-list"], 0).0, 0);
    assert_eq!(
        w.execute(&args(&["host-list"]), ms(0)).duration,
        Duration::MAX
    );
}

#[test]
fn a_pool_keeps_each_hosts_devices_apart() {
    let mut w = World::new(WorldConfig::default());
    let a = w.add_host("a");
    let b = w.add_host("b");
    w.set_usb_devices(&a, vec![coral_ready_device("2-4")], ms(0));
    w.set_usb_devices(&b, vec![coral_ready_device("2-4")], ms(0));
    w.scan_now(&a);
    w.scan_now(&b);
    let (_, out, _) = xe(
        &mut w,
        &["pusb-list", &format!("host-uuid={a}"), "--minimal"],
        0,
    );
    assert_eq!(out.trim().split(',').count(), 1);
    w.set_usb_devices(&b, vec![], ms(0));
    w.scan_now(&b);
    assert_eq!(w.pusbs.len(), 1);
    assert_eq!(w.pusbs[0].host_uuid, a);
}

#[test]
fn the_fake_xe_binary_keeps_the_world_and_follows_the_bus_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("xapi.json");
    let bus = dir.path().join("bus.json");
    let mut w = World::new(WorldConfig {
        scan_delay_ms: 0,
        call_ms: 0,
        ..WorldConfig::default()
    });
    let host = w.add_host("a");
    w.add_vm("frigate", PowerState::Halted, None);
    SimState::starting_now(w).save(&state).unwrap();
    std::fs::write(
        &bus,
        serde_json::to_string(&vec![coral_ready_device("2-4")]).unwrap(),
    )
    .unwrap();

    let xe_bin = coral_testkit::e2e::xe_sim_bin();
    let run = |line: &[&str]| {
        std::process::Command::new(&xe_bin)
            .args(line)
            .env("CORAL_XE_SIM_STATE", &state)
            .env("CORAL_XE_SIM_USB", &bus)
            .output()
            .unwrap()
    };
    let first = run(&["pusb-list", "params=path", "--minimal"]);
    assert!(first.status.success());
    let out = run(&[
        "pusb-list",
        &format!("host-uuid={host}"),
        "params=path",
        "--minimal",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2-4\n",
        "the bus change reached XAPI by a scan"
    );
    let bad = run(&["vm-start", "vm=nope"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr),
        "Error: No matching VMs found\n"
    );
    let saved = SimState::load(&state).unwrap();
    assert_eq!(saved.world.calls.len(), 3);

    let missing = std::process::Command::new(&xe_bin)
        .arg("vm-list")
        .env_remove("CORAL_XE_SIM_STATE")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

fn vm_field(w: &mut World, vm: &str, field: &str, at: u64) -> String {
    let (_, out, _) = xe(
        w,
        &[
            "vm-param-get",
            &format!("uuid={vm}"),
            &format!("param-name={field}"),
        ],
        at,
    );
    out.trim_end().to_string()
}

#[test]
fn a_clean_shutdown_goes_on_inside_xapi_after_its_client_gave_up() {
    let (mut w, host) = one_host();
    w.config.shutdown_ms = 8_000;
    let vm = w.add_vm("frigate", PowerState::Running, Some(&host));
    // The client is killed at 3 s; xapi never notices.
    let r = w.execute(&args(&["vm-shutdown", &format!("uuid={vm}")]), ms(0));
    assert_eq!(r.duration, ms(150 + 8_000));
    assert_eq!(vm_field(&mut w, &vm, "power-state", 3_000), "running");
    assert_eq!(
        vm_field(&mut w, &vm, "current-operations", 3_000),
        "clean_shutdown"
    );
    let (status, _, err) = xe(&mut w, &["vm-shutdown", &format!("uuid={vm}")], 3_100);
    assert_eq!(status, 1);
    assert!(
        err.starts_with("Another operation involving the object is currently in progress"),
        "{err}"
    );
    let (status, _, _) = xe(&mut w, &["vm-start", &format!("uuid={vm}")], 3_200);
    assert_eq!(status, 1, "nothing else meanwhile");
    // Later the VM halts, and nobody starts it again.
    assert_eq!(vm_field(&mut w, &vm, "power-state", 8_200), "halted");
    assert_eq!(vm_field(&mut w, &vm, "current-operations", 8_200), "");

    // A hard shutdown is allowed meanwhile and voids the clean one.
    let (mut w, host) = one_host();
    w.config.shutdown_ms = 8_000;
    let vm = w.add_vm("frigate", PowerState::Running, Some(&host));
    w.execute(&args(&["vm-shutdown", &format!("uuid={vm}")]), ms(0));
    let (status, _, err) = xe(
        &mut w,
        &["vm-shutdown", &format!("uuid={vm}"), "force=true"],
        3_000,
    );
    assert_eq!(status, 0, "{err}");
    assert_eq!(vm_field(&mut w, &vm, "power-state", 3_200), "halted");
    xe(&mut w, &["vm-start", &format!("uuid={vm}")], 4_000);
    w.advance(ms(20_000));
    let transitions: Vec<_> = w.power_history.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        transitions,
        vec![
            (PowerState::Running, PowerState::Halted),
            (PowerState::Halted, PowerState::Running)
        ],
        "the voided clean shutdown never lands"
    );

    // A guest that never acknowledges: the operation shows until it fails.
    let (mut w, host) = one_host();
    let vm = w.add_vm("frigate", PowerState::Running, Some(&host));
    w.vm_mut(&vm).unwrap().guest_shutdown = GuestShutdown::NeverAcknowledges;
    w.execute(&args(&["vm-shutdown", &format!("uuid={vm}")]), ms(0));
    assert_eq!(
        vm_field(&mut w, &vm, "current-operations", 30_000),
        "clean_shutdown"
    );
    assert_eq!(vm_field(&mut w, &vm, "current-operations", 61_000), "");
    assert_eq!(vm_field(&mut w, &vm, "power-state", 61_000), "running");
}

#[test]
fn a_slow_call_takes_effect_even_when_its_client_gives_up() {
    let (mut w, host) = one_host();
    let vm = w.add_vm("frigate", PowerState::Halted, None);
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(0));
    w.scan_now(&host);
    let group = w.groups[0].uuid.clone();
    w.faults
        .push(Fault::every("vusb-create", FaultKind::Slow { ms: 60_000 }));
    let r = w.execute(
        &args(&[
            "vusb-create",
            &format!("usb-group-uuid={group}"),
            &format!("vm-uuid={vm}"),
        ]),
        ms(0),
    );
    assert_eq!(r.duration, ms(150 + 60_000));
    assert_eq!(w.vusbs.len(), 1);
}

#[test]
fn xapi_down_then_starting_then_up() {
    let (mut w, _) = one_host();
    w.add_vm("frigate", PowerState::Halted, None);
    w.outages.push(Outage {
        from_ms: 0,
        until_ms: 1_000,
        kind: OutageKind::Refused,
    });
    w.outages.push(Outage {
        from_ms: 1_000,
        until_ms: 2_000,
        kind: OutageKind::StillBooting,
    });
    let (status, out, err) = xe(&mut w, &["vm-list", "--minimal"], 500);
    assert_eq!(
        (status, out.as_str(), err.as_str()),
        (1, "", "Error: Connection refused (calling connect )\n")
    );
    let (status, _, err) = xe(&mut w, &["vm-list", "--minimal"], 1_500);
    assert_eq!(
        (status, err.as_str()),
        (
            1,
            "The host toolstack is still initialising. Please wait.\n"
        )
    );
    let (status, out, _) = xe(&mut w, &["vm-list", "--minimal"], 2_000);
    assert_eq!(status, 0);
    assert!(!out.trim().is_empty());
}

#[test]
fn arguments_are_split_at_newlines_so_a_name_with_one_cannot_travel() {
    let (mut w, _) = one_host();
    let a = w.add_vm("cam", PowerState::Halted, None);
    let b = w.add_vm("other", PowerState::Halted, None);
    w.add_vm("cam\nfrigate", PowerState::Halted, None);
    let (status, _, err) = xe(
        &mut w,
        &["vm-list", "name-label=cam\nfrigate", "--minimal"],
        0,
    );
    assert_eq!(
        (status, err.as_str()),
        (1, "Error: Unknown field 'frigate'\n")
    );
    // A value that smuggles a second filter becomes one.
    let (status, out, _) = xe(
        &mut w,
        &[
            "vm-list",
            &format!("name-label=cam\nuuid={b}"),
            "params=uuid",
            "--minimal",
        ],
        0,
    );
    assert_eq!(status, 0);
    assert_ne!(out.trim(), a);
    // The human output is a line protocol: a name can fake a field.
    let (_, out, _) = xe(
        &mut w,
        &["vm-list", "params=name-label,uuid", &format!("uuid={a}")],
        0,
    );
    assert!(out.contains(&a));
    w.vm_mut(&a).unwrap().name_label = format!("x\n    uuid ( RO): {b}");
    let (_, out, _) = xe(
        &mut w,
        &["vm-list", "params=name-label", &format!("uuid={a}")],
        0,
    );
    assert!(out.contains(&format!("uuid ( RO): {b}")), "{out}");
}

#[test]
fn scans_run_in_order_and_commit_what_they_read_earlier() {
    let (mut w, host) = one_host();
    let vm = w.add_vm("frigate", PowerState::Halted, None);
    // Before the power loss: the ready Coral, its PUSB and a VUSB.
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(0));
    w.scan_now(&host);
    w.pending_scans.clear();
    let stale = w.pusbs[0].uuid.clone();
    let group = w.pusbs[0].usb_group_uuid.clone();
    xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={group}"),
            &format!("vm-uuid={vm}"),
        ],
        0,
    );
    // Boot: xapi's start-up scan read the bus while the Coral was a boot
    // loader, and commits only at 3 s.
    w.hosts[0].usb_devices = vec![coral_bootloader_device("1-4")];
    w.queue_scan_that_saw(&host, vec![coral_bootloader_device("1-4")], 3_000);
    // The Coral is back as 18d1:9302 at 1 s: udev's scan waits its turn.
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(1_000));
    let list = |w: &mut World, at| {
        xe(
            w,
            &["pusb-list", "product-id=9302", "params=uuid", "--minimal"],
            at,
        )
        .1
        .trim()
        .to_string()
    };
    assert_eq!(
        list(&mut w, 2_000),
        stale,
        "the stale record is still listed"
    );
    assert_eq!(w.vusbs.len(), 1);
    assert_eq!(
        list(&mut w, 3_100),
        "",
        "removed by the late scan, VUSB too"
    );
    assert!(w.vusbs.is_empty());
    let fresh = list(&mut w, 3_600);
    assert!(
        !fresh.is_empty() && fresh != stale,
        "a fresh record: {fresh}"
    );

    // A scan that reads the bus between the removal and the addition of a
    // re-enumeration removes the records even though the device is back.
    let (mut w, host) = one_host();
    w.config.scan_read_ms = 100;
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(0));
    w.scan_now(&host);
    w.pending_scans.clear();
    let before = w.pusbs[0].uuid.clone();
    w.set_usb_devices(&host, vec![], ms(1_000));
    w.set_usb_devices(&host, vec![coral_ready_device("2-4")], ms(1_200));
    w.advance(ms(1_500));
    assert!(w.pusbs.is_empty(), "the removal's scan committed");
    w.advance(ms(2_000));
    assert_eq!(w.pusbs.len(), 1);
    assert_ne!(w.pusbs[0].uuid, before);
}

#[test]
fn a_vm_with_vusbs_on_two_hosts_starts_nowhere() {
    let mut w = World::new(WorldConfig::default());
    let a = w.add_host("a");
    let b = w.add_host("b");
    let vm = w.add_vm("frigate", PowerState::Halted, None);
    for h in [&a, &b] {
        w.set_usb_devices(h, vec![coral_ready_device("2-4")], ms(0));
        w.scan_now(h);
    }
    w.pending_scans.clear();
    let groups: Vec<String> = w.pusbs.iter().map(|p| p.usb_group_uuid.clone()).collect();
    xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={}", groups[1]),
            &format!("vm-uuid={vm}"),
        ],
        0,
    );
    let (status, _, _) = xe(&mut w, &["vm-start", &format!("uuid={vm}")], 0);
    assert_eq!(status, 0, "one host holds every PUSB");
    w.advance(ms(10_000));
    assert_eq!(w.vm(&vm).unwrap().resident_on.as_deref(), Some(b.as_str()));
    xe(
        &mut w,
        &["vm-shutdown", &format!("uuid={vm}"), "force=true"],
        10_000,
    );
    xe(
        &mut w,
        &[
            "vusb-create",
            &format!("usb-group-uuid={}", groups[0]),
            &format!("vm-uuid={vm}"),
        ],
        11_000,
    );
    let (status, out, err) = xe(&mut w, &["vm-start", &format!("uuid={vm}")], 11_000);
    assert_eq!(status, 1);
    assert!(
        err.starts_with("There were no hosts available to complete the specified operation."),
        "{err}"
    );
    assert_eq!(out.lines().count(), 2, "a per-host report first: {out}");
}

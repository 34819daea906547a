//! `coral watch` end to end: the real binary through the real libusb, the
//! umockdev Coral dropping off the bus and coming back as its boot loader
//! while the watcher runs, a fake `xe` whose scans replay the bus changes
//! in order, and SIGTERM from the emulator to end the watch. Each test
//! asserts the devices, the XAPI records and the VM power history.

mod support;

use coral::mapping_state::StateStore;
use coral_testkit::xapi::{coral_ready_device, Outage, OutageKind, PowerState, Vusb, World};
use serde_json::Value;
use support::*;

/// A pool whose Corals (ready, at `paths`) are each passed through to their
/// own VM (`frigate`, then `cam-2`, …) in `power`, as after a good boot.
fn healthy_pool(power: PowerState, paths: &[&str]) -> (World, String, Vec<String>) {
    let present = paths.iter().map(|p| coral_ready_device(p)).collect();
    let (mut world, host, first) = pool(fast_config(), "frigate", power, present);
    let mut vms = vec![first];
    for i in 1..paths.len() {
        let resident = (power == PowerState::Running).then_some(host.as_str());
        vms.push(world.add_vm(&format!("cam-{}", i + 1), power, resident));
    }
    for (path, vm) in paths.iter().zip(&vms) {
        let pusb = world
            .pusbs
            .iter_mut()
            .find(|p| p.host_uuid == host && p.device.path == *path)
            .expect("XAPI lists the ready Coral");
        pusb.passthrough_enabled = true;
        let group = pusb.usb_group_uuid.clone();
        let uuid = world.new_uuid();
        world.vusbs.push(Vusb {
            uuid,
            vm_uuid: vm.clone(),
            usb_group_uuid: group,
            currently_attached: power == PowerState::Running,
            other_config: Default::default(),
        });
    }
    (world, host, vms)
}

/// `coral watch ARGS` under the emulated Coral (ready at 2-4) with
/// `emulator` options; the state directory and firmware are the test's.
fn watch(xapi: &FakeXapi, emulator: &[&str], args: &[&str]) -> Run {
    let fw = shared_firmware("apex_latest_single_ep.bin").expect("checked by the caller");
    let mut emu: Vec<String> = ["--state", "ready", "--reenumerate-ms", "300"]
        .iter()
        .chain(emulator)
        .map(|s| s.to_string())
        .collect();
    emu.extend(xapi.bus_args());
    let mut command = vec![coral_bin().display().to_string(), "watch".to_string()];
    command.extend(args.iter().map(|s| s.to_string()));
    command.extend(["--firmware".to_string(), fw.display().to_string()]);
    emulate(&emu, &command, &env(xapi))
}

fn env(xapi: &FakeXapi) -> Vec<(String, String)> {
    let mut env = xapi.env();
    env.push((
        "CORAL_STATE_DIR".into(),
        xapi.dir().join("state").display().to_string(),
    ));
    env.push((
        "CORAL_CONFIG".into(),
        xapi.dir().join("coral.toml").display().to_string(),
    ));
    env
}

/// DNLOAD requests the Coral at `path` received.
fn downloads_to(run: &Run, path: &str) -> usize {
    run.result["requests"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["request"] == 1 && r["type"] == 0x21 && r["path"] == path)
                .count()
        })
        .unwrap_or(0)
}

/// The emulator's events, as (ms since its start, text).
fn events(run: &Run) -> Vec<(f64, String)> {
    run.result["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["t_ms"].as_f64().unwrap_or(0.0),
                        e["event"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn the_watch_stopped_cleanly(run: &Run) {
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("watch: stopping"), "{}", run.stderr);
}

#[test]
fn a_coral_that_drops_while_its_vm_is_halted_is_back_on_its_vm_without_a_power_change() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Halted, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &["--drop-at-ms", "1500", "--sigterm-at-ms", "7000"],
        &["--vm", "frigate"],
    );
    the_watch_stopped_cleanly(&run);
    assert_eq!(
        run.devices(),
        vec![("2-4".to_string(), "18d1:9302".to_string())]
    );
    assert_eq!(downloads_to(&run, "1-4"), 44, "one firmware download");
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, false)],
        "one VUSB, on the group of the Coral's new PUSB"
    );
    assert!(vm_power_transitions(&world, &vms[0]).is_empty());
    let states = StateStore::in_dir(&xapi.dir().join("state"))
        .load()
        .unwrap();
    assert_eq!(states.mappings[&vms[0]].last_action_ok, Some(true));
}

#[test]
fn a_running_vm_is_not_restarted_without_the_restart_policy_and_the_journal_says_pending_restart() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Running, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &["--drop-at-ms", "1500", "--sigterm-at-ms", "7000"],
        &["--vm", "frigate"],
    );
    the_watch_stopped_cleanly(&run);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, false)],
        "the VUSB is back, attached at the VM's next start"
    );
    assert!(
        vm_power_transitions(&world, &vms[0]).is_empty(),
        "never restarted"
    );
    assert!(!world.calls.iter().any(|c| c.args[0] == "vm-shutdown"));
    let pending: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("pending restart"))
        .collect();
    assert_eq!(pending.len(), 1, "{}", run.stderr);
    assert!(
        pending[0].contains(&format!("coral attach --vm {} --restart", vms[0])),
        "{}",
        pending[0]
    );
}

#[test]
fn a_running_vm_is_restarted_once_when_its_policy_allows_it() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Running, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &["--drop-at-ms", "1500", "--sigterm-at-ms", "8000"],
        &["--vm", "frigate", "--restart"],
    );
    the_watch_stopped_cleanly(&run);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, true)],
        "attached: the VM was restarted with it"
    );
    assert_eq!(
        vm_power_transitions(&world, &vms[0]),
        vec![
            (PowerState::Running, PowerState::Halted),
            (PowerState::Halted, PowerState::Running)
        ]
    );
    assert!(
        !world
            .calls
            .iter()
            .any(|c| c.args.iter().any(|a| a == "force=true")),
        "never a hard stop"
    );
}

#[test]
fn the_restart_rate_limit_leaves_the_second_drop_pending() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Running, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &[
            "--drop-at-ms",
            "1500",
            "--drop-at-ms",
            "6000",
            "--sigterm-at-ms",
            "11000",
        ],
        &[
            "--vm",
            "frigate",
            "--restart",
            "--max-restarts-per-hour",
            "1",
        ],
    );
    the_watch_stopped_cleanly(&run);
    assert_eq!(downloads_to(&run, "1-4"), 88, "two drops, two downloads");
    let world = xapi.world();
    assert_eq!(
        vm_power_transitions(&world, &vms[0]),
        vec![
            (PowerState::Running, PowerState::Halted),
            (PowerState::Halted, PowerState::Running)
        ],
        "one restart only"
    );
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, false)]
    );
    assert!(
        run.stderr.contains("restart limit of 1 per hour reached"),
        "{}",
        run.stderr
    );
}

#[test]
fn detach_pauses_the_mapping_and_the_watcher_leaves_the_coral_alone() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Halted, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    let detach = coral_under(
        &[
            "--state",
            "ready",
            "--bus-file",
            &xapi.bus.display().to_string(),
        ],
        &["detach", "--vm", "frigate"],
        &env(&xapi),
    );
    assert_eq!(detach.status, Some(0), "{}", detach.stderr);
    let run = watch(
        &xapi,
        &["--drop-at-ms", "1500", "--sigterm-at-ms", "5000"],
        &["--vm", "frigate"],
    );
    the_watch_stopped_cleanly(&run);
    assert_eq!(
        run.devices(),
        vec![("1-4".to_string(), "1a6e:089a".to_string())],
        "left in its boot loader"
    );
    assert_eq!(run.requests().len(), 0, "no USB request at all");
    let world = xapi.world();
    assert!(
        !world.vusbs.iter().any(|v| v.vm_uuid == vms[0]),
        "no VUSB recreated"
    );
    assert!(
        run.stderr.contains("paused by a deliberate detach"),
        "{}",
        run.stderr
    );
}

#[test]
fn sigterm_in_the_middle_of_a_recovery_ends_the_watch_at_once_and_a_rerun_converges() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Halted, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    // The Coral takes 4 s to come back after the reset; SIGTERM arrives
    // while the watcher waits for it.
    let run = watch(
        &xapi,
        &[
            "--reenumerate-ms",
            "4000",
            "--drop-at-ms",
            "1000",
            "--sigterm-at-ms",
            "3500",
        ],
        &["--vm", "frigate"],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let events = events(&run);
    let at = |what: &str| {
        events
            .iter()
            .find(|(_, e)| e.starts_with(what))
            .map(|(t, _)| *t)
    };
    let sigterm = at("sigterm").expect("SIGTERM was sent");
    let exit = at("exit").expect("coral exited");
    let reset = at("reset 1-4").expect("the watcher uploaded and reset");
    let back = events
        .iter()
        .find(|(t, e)| *t > reset && e.starts_with("add 2-4"))
        .map(|(t, _)| *t);
    assert!(sigterm < exit);
    assert!(
        back.is_none_or(|back| exit < back),
        "coral did not wait out the re-enumeration: {events:?}"
    );
    let world = xapi.world();
    assert!(
        !world.vusbs.iter().any(|v| v.vm_uuid == vms[0]),
        "no VUSB half-made"
    );
    assert!(vm_power_transitions(&world, &vms[0]).is_empty());

    // The Coral as the interrupted run left it (re-enumerating, then ready):
    // the next watcher (systemd restarts it) finishes the job.
    let rerun = watch(&xapi, &["--sigterm-at-ms", "5000"], &["--vm", "frigate"]);
    the_watch_stopped_cleanly(&rerun);
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, false)]
    );
}

#[test]
fn of_two_corals_only_the_one_that_dropped_is_reinitialized_and_reattached() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vms) = healthy_pool(PowerState::Halted, &["2-4", "2-5"]);
    let other_vusb = world
        .vusbs
        .iter()
        .find(|v| v.vm_uuid == vms[1])
        .map(|v| v.uuid.clone())
        .unwrap();
    let xapi = FakeXapi::new(world, &host);
    let config = format!(
        "[[coral]]\nvm = \"{}\"\nvm_name = \"frigate\"\ndevice = \"2-4\"\n\n[[coral]]\nvm = \"{}\"\nvm_name = \"cam-2\"\ndevice = \"2-5\"\n",
        vms[0], vms[1]
    );
    std::fs::write(xapi.dir().join("coral.toml"), config).unwrap();
    let run = watch(
        &xapi,
        &[
            "--second-coral",
            "1-5:2-5",
            "--second-state",
            "ready",
            "--drop-at-ms",
            "1500",
            "--sigterm-at-ms",
            "7000",
        ],
        &[],
    );
    the_watch_stopped_cleanly(&run);
    let mut devices = run.devices();
    devices.sort();
    assert_eq!(
        devices,
        vec![
            ("2-4".to_string(), "18d1:9302".to_string()),
            ("2-5".to_string(), "18d1:9302".to_string())
        ]
    );
    assert_eq!(downloads_to(&run, "1-4"), 44);
    assert_eq!(downloads_to(&run, "1-5"), 0, "the other Coral untouched");
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, false)]
    );
    let kept: Vec<&Vusb> = world.vusbs.iter().filter(|v| v.vm_uuid == vms[1]).collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].uuid, other_vusb, "the same VUSB record");
}

#[test]
fn xapi_unavailable_while_the_coral_comes_back_is_retried_until_it_answers() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (mut world, host, vms) = healthy_pool(PowerState::Halted, &["2-4"]);
    world.outages.push(Outage {
        from_ms: 1_000,
        until_ms: 5_000,
        kind: OutageKind::Refused,
    });
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &["--drop-at-ms", "1500", "--sigterm-at-ms", "14000"],
        &["--vm", "frigate"],
    );
    the_watch_stopped_cleanly(&run);
    assert!(
        run.stderr.contains("xapi is not available yet") && run.stderr.contains("waiting up to"),
        "the watcher waited for xapi (said once): {}",
        run.stderr
    );
    let world = xapi.world();
    assert_eq!(
        vusbs_on_ready_group(&world, &host, &vms[0], "2-4"),
        vec![(true, false)]
    );
    assert!(
        world
            .calls
            .iter()
            .filter(|c| c.args[0] == "vusb-create")
            .count()
            == 1,
        "exactly one VUSB created"
    );
}

/// Figures for the closing note (`scripts/bench-watch.sh`): from the boot
/// loader appearing to the VUSB existing, and to the VM running again.
#[test]
#[ignore = "benchmark: scripts/bench-watch.sh"]
fn figures() {
    assert!(
        umockdev_and_firmware_available(),
        "umockdev and ../shared/firmware are needed"
    );
    for restart in [false, true] {
        let mut to_vusb = Vec::new();
        let mut to_running = Vec::new();
        for _ in 0..5 {
            let power = if restart {
                PowerState::Running
            } else {
                PowerState::Halted
            };
            let (world, host, vms) = healthy_pool(power, &["2-4"]);
            let xapi = FakeXapi::new(world, &host);
            let mut args = vec!["--vm", "frigate"];
            if restart {
                args.push("--restart");
            }
            let run = watch(
                &xapi,
                &["--drop-at-ms", "1500", "--sigterm-at-ms", "8000"],
                &args,
            );
            the_watch_stopped_cleanly(&run);
            let state: Value =
                serde_json::from_str(&std::fs::read_to_string(&xapi.state).unwrap()).unwrap();
            let origin = state["origin_unix_ms"].as_u64().unwrap();
            let boot_loader = run.result["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["event"].as_str().unwrap_or("").starts_with("add 1-4"))
                .map(|e| e["unix_ms"].as_u64().unwrap())
                .next_back()
                .unwrap();
            let world = xapi.world();
            let created = world
                .calls
                .iter()
                .find(|c| c.args[0] == "vusb-create")
                .map(|c| origin + c.at_ms)
                .unwrap();
            to_vusb.push(created.saturating_sub(boot_loader));
            if let Some(started) = world
                .power_history
                .iter()
                .find(|e| e.vm_uuid == vms[0] && e.to == PowerState::Running)
            {
                to_running.push((origin + started.at_ms).saturating_sub(boot_loader));
            }
        }
        to_vusb.sort();
        to_running.sort();
        eprintln!(
            "watch, VM {}: boot loader -> VUSB exists: median {} ms {:?}; -> VM running again: {:?}",
            if restart {
                "running, --restart"
            } else {
                "halted"
            },
            to_vusb[to_vusb.len() / 2],
            to_vusb,
            to_running
        );
    }
}

/// CPU time and peak RSS of the watcher over one idle minute (the Coral and
/// its VM healthy), read from /proc just before SIGTERM. Under umockdev the
/// process also carries umockdev's preload (GLib), so RSS is an upper bound.
#[test]
#[ignore = "benchmark: scripts/bench-watch.sh"]
fn idle_minute() {
    assert!(
        umockdev_and_firmware_available(),
        "umockdev and ../shared/firmware are needed"
    );
    let (world, host, _vms) = healthy_pool(PowerState::Running, &["2-4"]);
    let xapi = FakeXapi::new(world, &host);
    let marker = xapi.dir().join("state").display().to_string();
    let sampler = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        let ticks = 100.0; // USER_HZ on Linux
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            // coral itself (argv[0] is the binary), not the emulator that
            // shares its environment and names it on its command line.
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let is_watcher = String::from_utf8_lossy(&environ).contains(&marker)
                && String::from_utf8_lossy(argv0).ends_with("/coral");
            if !is_watcher {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap();
            let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
            let user: f64 = fields[11].parse::<f64>().unwrap() / ticks;
            let sys: f64 = fields[12].parse::<f64>().unwrap() / ticks;
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let hwm = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .unwrap_or("VmHWM: ?")
                .to_string();
            return format!(
                "idle minute: CPU user {user:.2} s + sys {sys:.2} s ({:.2} % of one core); {hwm}",
                (user + sys) / 60.0 * 100.0
            );
        }
        "idle minute: watcher process not found".to_string()
    });
    let run = watch(&xapi, &["--sigterm-at-ms", "61000"], &["--vm", "frigate"]);
    the_watch_stopped_cleanly(&run);
    eprintln!("{}", sampler.join().unwrap());
    let calls = xapi.world().calls.len();
    eprintln!("idle minute: {calls} xe calls in total (all reads)");
}

// --- A Coral that re-enumerates as itself (xapi-usb.md, "A drop that XAPI
// does not see"): the emulated link drop is back within 50 ms with a new
// device number; the fake xe's scans read the bus 120 ms after udev's event
// (the `xe pusb-scan` process and the scan thread's wake-up), so they find
// the same identity and keep the PUSB, the group and the attached VUSB.

/// Time from a scan's start to its reading of the bus: longer than the drop.
const SCAN_READ_MS: u64 = 120;

/// `frigate` running with the ready Coral at 2-4 attached, on a pool whose
/// scans read the bus after a 50 ms link drop is over.
fn pool_that_misses_a_link_drop() -> (World, String, String) {
    let config = coral_testkit::xapi::WorldConfig {
        scan_read_ms: SCAN_READ_MS,
        ..fast_config()
    };
    let (mut world, host, vm) = pool(
        config,
        "frigate",
        PowerState::Running,
        vec![coral_ready_device("2-4")],
    );
    let pusb = world
        .pusbs
        .iter_mut()
        .find(|p| p.host_uuid == host && p.device.path == "2-4")
        .expect("XAPI lists the ready Coral");
    pusb.passthrough_enabled = true;
    let group = pusb.usb_group_uuid.clone();
    let uuid = world.new_uuid();
    world.vusbs.push(Vusb {
        uuid,
        vm_uuid: vm.clone(),
        usb_group_uuid: group,
        currently_attached: true,
        other_config: Default::default(),
    });
    (world, host, vm)
}

/// The records a missed drop must leave alone: PUSB uuids, VUSB uuids and
/// whether each is attached.
fn xapi_records(world: &World) -> (Vec<String>, Vec<(String, bool)>) {
    (
        world.pusbs.iter().map(|p| p.uuid.clone()).collect(),
        world
            .vusbs
            .iter()
            .map(|v| (v.uuid.clone(), v.currently_attached))
            .collect(),
    )
}

/// The emulator's device numbers of the Coral, in order of its adds.
fn devnums(run: &Run) -> Vec<String> {
    events(run)
        .into_iter()
        .filter(|(_, e)| e.starts_with("add 2-4 18d1:9302"))
        .map(|(_, e)| e.rsplit(' ').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_link_drop_under_a_running_vm_costs_one_clean_restart_when_allowed() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vm) = pool_that_misses_a_link_drop();
    let before = xapi_records(&world);
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &["--link-drop-at-ms", "1500", "--sigterm-at-ms", "6000"],
        &["--vm", "frigate", "--restart"],
    );
    the_watch_stopped_cleanly(&run);
    assert_eq!(devnums(&run).len(), 2, "{:?}", events(&run));
    let world = xapi.world();
    assert_eq!(xapi_records(&world), before, "XAPI never saw the drop");
    assert_eq!(vm_power_transitions(&world, &vm), ONE_RESTART);
    assert_eq!(
        downloads_to(&run, "1-4"),
        0,
        "no firmware upload: it kept its firmware"
    );
    assert!(run.stderr.contains("lost its Coral"), "{}", run.stderr);
    assert!(!world
        .calls
        .iter()
        .any(|c| c.args.iter().any(|a| a == "force=true")));
}

#[test]
fn a_link_drop_under_a_running_vm_is_one_line_naming_the_command_when_restarts_are_not_allowed() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vm) = pool_that_misses_a_link_drop();
    let before = xapi_records(&world);
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &["--link-drop-at-ms", "1500", "--sigterm-at-ms", "6000"],
        &["--vm", "frigate"],
    );
    the_watch_stopped_cleanly(&run);
    let world = xapi.world();
    assert_eq!(xapi_records(&world), before);
    assert!(vm_power_transitions(&world, &vm).is_empty());
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("lost its Coral"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    for part in [
        "VM 'frigate'",
        "2-4",
        "re-enumerated",
        "restarts not allowed",
        &format!("`coral attach --vm {vm} --restart`"),
    ] {
        assert!(lines[0].contains(part), "{part:?} in {}", lines[0]);
    }
    let state = StateStore::in_dir(&xapi.dir().join("state"))
        .load()
        .unwrap();
    let last = state.mappings[&vm].last_action.clone().unwrap();
    assert!(last.contains("lost its Coral"), "{last}");
}

#[test]
fn link_drops_restart_the_vm_within_the_hourly_budget_only() {
    if !umockdev_and_firmware_available() {
        return;
    }
    let (world, host, vm) = pool_that_misses_a_link_drop();
    let xapi = FakeXapi::new(world, &host);
    let run = watch(
        &xapi,
        &[
            "--link-drop-at-ms",
            "1500",
            "--link-drop-at-ms",
            "4500",
            "--sigterm-at-ms",
            "8000",
        ],
        &[
            "--vm",
            "frigate",
            "--restart",
            "--max-restarts-per-hour",
            "1",
        ],
    );
    the_watch_stopped_cleanly(&run);
    assert_eq!(devnums(&run).len(), 3, "{:?}", events(&run));
    let world = xapi.world();
    assert_eq!(vm_power_transitions(&world, &vm), ONE_RESTART);
    assert!(
        run.stderr.contains("restart limit of 1 per hour reached"),
        "{}",
        run.stderr
    );
}

//! `coral attach` against the in-process simulators: the fault matrix (every
//! mutating xe call failing in turn, hanging shutdowns, a start that fails
//! with the VUSB), bad input, pool members, and xe call counts.

use coral::clock::VirtualClock;
use coral::error::exit_code_of;
use coral::ops::attach::{attach, AttachOptions, AttachReport};
use coral::sim::coral::{SimBus, SimCoralConfig};
use coral::sim::host::SimulatedHost;
use coral::sim::xapi::{
    coral_ready_device, Fault, FaultKind, GuestShutdown, PowerState, World, WorldConfig,
};
use coral::usb::CoralState;
use coral::xe::client::XeClient;
use std::rc::Rc;
use std::time::Duration;

const WRITES: &[&str] = &[
    "pusb-param-set",
    "vusb-create",
    "vm-shutdown",
    "vm-start",
    "vusb-destroy",
    "pusb-scan",
];

struct Rig {
    host: SimulatedHost,
    host_uuid: String,
    vm: String,
}

/// This host with a ready Coral at 2-4, another pool member with its own
/// Coral, and VMs: `name` (in `power`), "frigate-old", a template "frigate".
fn rig_with(name: &str, power: PowerState, tweak: impl FnOnce(&mut World, &str)) -> Rig {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Ready);
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-a");
    let other = world.add_host("xcp-b");
    let resident = (power == PowerState::Running).then_some(host_uuid.as_str());
    let vm = world.add_vm(name, power, resident);
    world.add_vm("frigate-old", PowerState::Running, Some(&host_uuid));
    let template = world.add_vm("frigate", PowerState::Halted, None);
    world.vm_mut(&template).unwrap().is_a_template = true;
    world.set_usb_devices(&other, vec![coral_ready_device("2-4")], Duration::ZERO);
    world.scan_now(&other);
    tweak(&mut world, &vm);
    Rig {
        host: SimulatedHost::from_parts(clock, bus, world, host_uuid.clone()),
        host_uuid,
        vm,
    }
}

fn rig(power: PowerState) -> Rig {
    rig_with("frigate", power, |_, _| {})
}

fn opts(vm: &str, restart: bool) -> AttachOptions {
    AttachOptions {
        vm: vm.into(),
        device: None,
        start: false,
        restart,
        force_shutdown: false,
        shutdown_timeout: Duration::from_secs(180),
        scan_timeout: Duration::from_secs(30),
    }
}

/// The client as `coral` builds it: waiting for xapi while it is down.
fn client(r: &Rig, dry_run: bool) -> XeClient<'_> {
    XeClient::new(r.host.xe(), r.host_uuid.clone(), dry_run)
        .waiting_for_xapi(r.host.clock(), Duration::from_secs(120))
}

fn run(r: &Rig, o: &AttachOptions) -> anyhow::Result<AttachReport> {
    let xe = client(r, false);
    attach(r.host.bus(), &xe, r.host.clock(), o)
}

/// (VUSBs of the VM on this host's Coral group, attached?) and the VM's power.
fn outcome(r: &Rig) -> (Vec<bool>, PowerState, usize) {
    let world = r.host.world();
    let world = world.borrow();
    let group = world
        .pusbs
        .iter()
        .find(|p| p.host_uuid == r.host_uuid && p.device.product_id == "9302")
        .map(|p| p.usb_group_uuid.clone());
    let vusbs = world
        .vusbs
        .iter()
        .filter(|v| v.vm_uuid == r.vm && Some(&v.usb_group_uuid) == group.as_ref())
        .map(|v| v.currently_attached)
        .collect();
    (
        vusbs,
        world.vm(&r.vm).unwrap().power_state,
        world.vusbs.len(),
    )
}

fn calls(r: &Rig) -> Vec<Vec<String>> {
    r.host
        .world()
        .borrow()
        .calls
        .iter()
        .map(|c| c.args.clone())
        .collect()
}

#[test]
fn call_counts_per_scenario() {
    let halted = rig(PowerState::Halted);
    run(&halted, &opts("frigate", false)).unwrap();
    let fresh = calls(&halted).len();
    assert!(fresh <= 8, "fresh attach to a halted VM: {fresh} calls");

    let before = calls(&halted).len();
    run(&halted, &opts("frigate", false)).unwrap();
    assert!(calls(&halted)[before..]
        .iter()
        .all(|c| !WRITES.contains(&c[0].as_str())));

    let running = rig(PowerState::Running);
    run(&running, &opts("frigate", true)).unwrap();
    let c = calls(&running);
    assert_eq!(c.iter().filter(|a| a[0] == "vm-shutdown").count(), 1);
    assert_eq!(c.iter().filter(|a| a[0] == "vm-start").count(), 1);
    let history = running.host.world().borrow().power_history.len();
    assert_eq!(history, 2, "one clean shutdown and one start, nothing else");

    let before = c.len();
    run(&running, &opts("frigate", false)).unwrap();
    let steady = &calls(&running)[before..];
    assert!(
        steady.len() <= 4,
        "already attached and running: {steady:?}"
    );
    assert!(steady.iter().all(|a| !WRITES.contains(&a[0].as_str())));
    eprintln!(
        "xe calls: fresh halted {fresh}, restart {before}, steady {}",
        steady.len()
    );
}

#[test]
fn every_mutating_call_failing_in_turn_leaves_the_vm_as_it_was_and_a_rerun_converges() {
    // (A single failing vm-start is retried: see the start tests.)
    for command in ["pusb-param-set", "vusb-create", "vm-shutdown"] {
        let r = rig_with("frigate", PowerState::Running, |w, _| {
            w.faults.push(Fault {
                command: command.into(),
                nth: Some(1),
                kind: FaultKind::Fail {
                    code: "INTERNAL_ERROR".into(),
                    params: vec![format!("{command} broke")],
                },
            })
        });
        let err = run(&r, &opts("frigate", true)).unwrap_err();
        let message = format!("{err:#}");
        assert!(!message.contains('\n'), "{command}: one line: {message}");
        let (vusbs, power, _) = outcome(&r);
        assert_eq!(
            power,
            PowerState::Running,
            "{command}: the VM runs again: {message}"
        );
        assert!(vusbs.is_empty(), "{command}: no stray VUSB: {message}");

        run(&r, &opts("frigate", true)).unwrap_or_else(|e| panic!("{command}: rerun: {e:#}"));
        assert_eq!(outcome(&r).0, vec![true], "{command}: converged");
    }
}

#[test]
fn shutdowns_that_hang_or_are_never_acknowledged_leave_the_vm_running() {
    let r = rig_with("frigate", PowerState::Running, |w, vm| {
        w.vm_mut(vm).unwrap().guest_shutdown = GuestShutdown::NeverAcknowledges
    });
    let err = run(&r, &opts("frigate", true)).unwrap_err();
    assert_eq!(exit_code_of(&err), 8, "{err:#}");
    let (vusbs, power, _) = outcome(&r);
    assert_eq!(power, PowerState::Running);
    assert!(vusbs.is_empty());
    assert!(r.host.world().borrow().power_history.is_empty());

    // A guest that acknowledges but never halts: xapi is still shutting it
    // down when coral gives up; the VUSB is kept and the error says so.
    let r = rig_with("frigate", PowerState::Running, |w, vm| {
        w.vm_mut(vm).unwrap().guest_shutdown = GuestShutdown::NeverHalts
    });
    let err = run(&r, &opts("frigate", true)).unwrap_err();
    let message = format!("{err:#}");
    assert_eq!(exit_code_of(&err), 8, "{message}");
    assert!(
        message.contains("DOWN") && message.contains(&format!("xe vm-start uuid={}", r.vm)),
        "{message}"
    );
    assert!(message.contains("is kept"), "{message}");
    let (vusbs, power, _) = outcome(&r);
    assert_eq!(power, PowerState::Running);
    assert_eq!(vusbs, vec![false], "kept and reported");
    assert!(r.host.world().borrow().power_history.is_empty());
    let r = rig_with("frigate", PowerState::Running, |w, _| {
        w.faults.push(Fault {
            command: "vm-shutdown".into(),
            nth: None,
            kind: FaultKind::Hang,
        })
    });
    let mut o = opts("frigate", true);
    o.shutdown_timeout = Duration::from_secs(5);
    let err = run(&r, &o).unwrap_err();
    assert!(
        format!("{err:#}").contains("did not answer within 5 s"),
        "{err:#}"
    );
    assert_eq!(outcome(&r).1, PowerState::Running);
    assert!(
        outcome(&r).0.is_empty(),
        "nothing pending in xapi: rolled back"
    );

    // --force-shutdown: a hard power-off only after the clean one failed.
    let r = rig_with("frigate", PowerState::Running, |w, vm| {
        w.vm_mut(vm).unwrap().guest_shutdown = GuestShutdown::NeverAcknowledges
    });
    let mut o = opts("frigate", true);
    o.force_shutdown = true;
    run(&r, &o).unwrap();
    assert_eq!(outcome(&r).0, vec![true]);
    let c = calls(&r);
    let shutdowns: Vec<_> = c.iter().filter(|a| a[0] == "vm-shutdown").collect();
    assert_eq!(shutdowns.len(), 2);
    assert!(
        !shutdowns[0].contains(&"force=true".to_string())
            && shutdowns[1].contains(&"force=true".to_string())
    );
}

#[test]
fn a_start_failing_with_the_coral_and_without_it_reports_the_vm_down() {
    let r = rig_with("frigate", PowerState::Running, |w, _| {
        w.faults.push(Fault {
            command: "vm-start".into(),
            nth: None,
            kind: FaultKind::Fail {
                code: "INTERNAL_ERROR".into(),
                params: vec!["no memory".into()],
            },
        })
    });
    let err = run(&r, &opts("frigate", true)).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("is DOWN") && message.contains("xe vm-start uuid="),
        "{message}"
    );
}

#[test]
fn bad_vm_names_are_refused_with_what_to_do() {
    let r = rig(PowerState::Halted);
    for (name, text) in [
        ("frig", "not found"),
        ("Frigate", "not found"),
        ("frigate*", "not found"),
        ("", "--vm is empty"),
    ] {
        let err = run(&r, &opts(name, false)).unwrap_err();
        assert_eq!(exit_code_of(&err), 8, "{name}");
        assert!(err.to_string().contains(text), "{name}: {err}");
    }
    assert!(r.host.world().borrow().vusbs.is_empty());

    let twins = rig_with("frigate", PowerState::Halted, |w, _| {
        w.add_vm("frigate", PowerState::Halted, None);
    });
    let err = run(&twins, &opts("frigate", false)).unwrap_err();
    assert!(
        err.to_string().contains("2 VMs are named 'frigate'"),
        "{err}"
    );
    run(&twins, &opts(&twins.vm, false)).expect("the uuid picks one");
    assert_eq!(outcome(&twins).0, vec![false]);

    for odd in [
        "cam, front",
        "a \"b\" 'c'",
        "x; reboot",
        "$(reboot)",
        "kamera-\u{fc}ber",
        "k=v",
    ] {
        let r = rig_with(odd, PowerState::Halted, |_, _| {});
        run(&r, &opts(odd, false)).unwrap_or_else(|e| panic!("{odd}: {e:#}"));
        assert_eq!(outcome(&r).0, vec![false], "{odd}");
    }
}

#[test]
fn paused_vms_and_a_coral_held_by_another_vm_are_refused() {
    let r = rig_with("frigate", PowerState::Running, |w, vm| {
        w.vm_mut(vm).unwrap().power_state = PowerState::Paused
    });
    let err = run(&r, &opts("frigate", true)).unwrap_err();
    assert!(err.to_string().contains("is paused"), "{err}");

    let r = rig(PowerState::Halted);
    run(&r, &opts("frigate-old", false)).unwrap();
    let err = run(&r, &opts("frigate", false)).unwrap_err();
    assert_eq!(exit_code_of(&err), 8);
    assert!(err.to_string().contains("coral detach --vm"), "{err}");
}

#[test]
fn xapi_limits_are_checked_before_calling() {
    let r = rig_with("frigate", PowerState::Halted, |w, vm| {
        w.vm_mut(vm).unwrap().ha_restart_priority = "restart".into()
    });
    let err = run(&r, &opts("frigate", false)).unwrap_err();
    assert!(err.to_string().contains("HA"), "{err}");
    assert!(!calls(&r).iter().any(|c| c[0] == "vusb-create"));
}

#[test]
fn two_ready_corals_need_device_and_a_coral_only_on_another_host_is_never_used() {
    let r = rig(PowerState::Halted);
    let err = {
        let clock = Rc::new(VirtualClock::new());
        let bus = SimBus::new(clock.clone());
        bus.add_coral(SimCoralConfig::xhci(4), CoralState::Ready);
        bus.add_coral(SimCoralConfig::xhci(3), CoralState::Ready);
        let xe = XeClient::new(r.host.xe(), r.host_uuid.clone(), false);
        attach(&bus, &xe, clock.as_ref(), &opts("frigate", false)).unwrap_err()
    };
    assert!(
        err.to_string().contains("2-3 (ready)") && err.to_string().contains("2-4 (ready)"),
        "{err}"
    );

    // This host's USB has no Coral; the other member's Coral is not ours.
    let clock = Rc::new(VirtualClock::new());
    let empty = SimBus::new(clock.clone());
    let xe = XeClient::new(r.host.xe(), r.host_uuid.clone(), false);
    let err = attach(&empty, &xe, clock.as_ref(), &opts("frigate", false)).unwrap_err();
    assert_eq!(exit_code_of(&err), 3);
    let world = r.host.world();
    assert!(world.borrow().pusbs.iter().all(|p| !p.passthrough_enabled));
}

#[test]
fn dry_run_reads_and_plans_but_changes_nothing() {
    let r = rig(PowerState::Running);
    let xe = client(&r, true);
    attach(r.host.bus(), &xe, r.host.clock(), &opts("frigate", true)).unwrap();
    let planned = xe.planned_commands();
    let verbs: Vec<&str> = planned
        .iter()
        .map(|p| p.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        verbs,
        vec!["pusb-param-set", "vusb-create", "vm-shutdown", "vm-start"]
    );
    assert!(calls(&r).iter().all(|c| !WRITES.contains(&c[0].as_str())));
    assert!(r.host.world().borrow().vusbs.is_empty());
}

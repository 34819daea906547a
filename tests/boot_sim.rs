//! The boot path (`coral up` without --vm) against the in-process simulated
//! host: every config entry, one failing entry not stopping the others, and
//! every wait inside the boot budget (virtual time).

mod support;

use coral::clock::VirtualClock;
use coral::config::{Config, Entry};
use coral::error::{next_step_of, NextStep};
use coral::ops::boot::{budget, up_all};
use coral::usb::CoralState;
use coral::xe::client::XeClient;
use coral_testkit::device::{SimBus, SimCoralConfig};
use coral_testkit::host::{stand_in_single_ep_image, SimulatedHost};
use coral_testkit::xapi::{Fault, FaultKind, PowerState, World, WorldConfig};
use std::rc::Rc;

/// Two Corals after a power loss (ports 4 and 5), two halted VMs.
fn host(faults: Vec<Fault>) -> (SimulatedHost, Vec<String>) {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Uninitialized);
    bus.add_coral(SimCoralConfig::xhci(5), CoralState::Uninitialized);
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-1");
    let vms = vec![
        world.add_vm("frigate", PowerState::Halted, None),
        world.add_vm("cam 2", PowerState::Halted, None),
    ];
    world.faults = faults;
    (SimulatedHost::from_parts(clock, bus, world, host_uuid), vms)
}

fn entry(vm: &str, device: &str) -> Entry {
    Entry {
        vm_uuid: vm.into(),
        vm_name: String::new(),
        device: Some(device.into()),
        start: false,
        restart: false,
        deadlines: Default::default(),
    }
}

#[test]
fn every_entry_is_recovered_and_a_missing_coral_does_not_stop_the_others() {
    let (host, vms) = host(Vec::new());
    let config = Config {
        entries: vec![
            entry(&vms[0], "2-4"),
            entry(&vms[1], "2-7"), // no Coral on port 7
        ],
    };
    let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false);
    let started = host.clock().now();
    let report = up_all(
        host.bus(),
        &xe,
        host.clock(),
        &mut || Ok(stand_in_single_ep_image()),
        &config,
        false,
        None,
    )
    .unwrap();
    let waited = host.clock().now() - started;
    assert!(report.outcomes[0].result.is_ok());
    assert!(report.outcomes[1].result.is_err());
    assert!(
        waited <= budget::AFTER_LOCK,
        "waited {waited:?} > {:?}",
        budget::AFTER_LOCK
    );
    let world = host.world();
    let world = world.borrow();
    let vusb_vms: Vec<&str> = world.vusbs.iter().map(|v| v.vm_uuid.as_str()).collect();
    assert_eq!(
        vusb_vms,
        vec![vms[0].as_str()],
        "only the first VM got a VUSB"
    );
    assert!(
        world.power_history.is_empty(),
        "no VM was started or stopped"
    );
    let err = report.into_result().unwrap_err();
    assert!(
        err.to_string().contains("1 of 2")
            && next_step_of(&err) == Some(&NextStep::UpAfterFixing { vm: vms[1].clone() }),
        "{err}"
    );
}

#[test]
fn xapi_that_never_answers_ends_the_wait_within_the_budget() {
    let (host, vms) = host(vec![Fault::every(
        "vm-list",
        FaultKind::fail("HOST_STILL_BOOTING", &[]),
    )]);
    let config = Config {
        entries: vec![entry(&vms[0], "2-4")],
    };
    let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false);
    let started = host.clock().now();
    let err = match up_all(
        host.bus(),
        &xe,
        host.clock(),
        &mut || Ok(stand_in_single_ep_image()),
        &config,
        false,
        None,
    ) {
        Ok(_) => panic!("xapi never answered"),
        Err(err) => err,
    };
    let waited = host.clock().now() - started;
    assert!(
        waited <= budget::XAPI_WAIT + std::time::Duration::from_secs(1),
        "{waited:?}"
    );
    assert!(
        err.to_string().contains("xapi did not answer")
            && next_step_of(&err) == Some(&NextStep::CheckXapiThenUp),
        "{err}"
    );
    // Nothing was written to a Coral while xapi was down.
    assert!(host.sim_bus().flashed(0).is_empty());
}

#[test]
fn the_budget_fits_the_unit_timeout() {
    assert!(budget::WORST_CASE_WAITS < budget::UNIT_START_TIMEOUT);
    assert!(
        budget::UNIT_START_TIMEOUT.as_secs() <= 300,
        "a few minutes, not 15"
    );
}

/// Four Corals after a power loss, two of whose downloads stall (the device
/// keeps asking the host to wait), a slow xapi (4 s per call), and a VM
/// that runs already with `restart = true`: everything ends within the one
/// deadline, and no VM that ran is left halted.
#[test]
fn stalled_corals_and_a_slow_xapi_stay_within_the_one_deadline() {
    use coral::ops::boot::boot_clock;
    use coral_testkit::device::SimFaults;
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    for port in 4..=7 {
        let index = bus.add_coral(SimCoralConfig::xhci(port), CoralState::Uninitialized);
        if port <= 5 {
            bus.set_faults(
                index,
                SimFaults {
                    busy_polls: 25,
                    poll_timeout_ms: 1_000,
                    ..SimFaults::default()
                },
            );
        }
    }
    let mut world = World::new(WorldConfig {
        call_ms: 4_000,
        ..WorldConfig::default()
    });
    let host_uuid = world.add_host("xcp-1");
    let mut vms: Vec<String> = (4..=6)
        .map(|p| world.add_vm(&format!("cam-{p}"), PowerState::Halted, None))
        .collect();
    vms.push(world.add_vm("cam-7", PowerState::Running, Some(&host_uuid)));
    let host = SimulatedHost::from_parts(clock, bus, world, host_uuid);
    let mut entries: Vec<Entry> = vms
        .iter()
        .zip(4..=7)
        .map(|(vm, port)| entry(vm, &format!("2-{port}")))
        .collect();
    entries[3].restart = true;
    let config = Config { entries };

    let started = host.clock().now();
    let bounded = boot_clock(host.clock());
    let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false).bounded_by(&bounded);
    let report = up_all(
        host.bus(),
        &xe,
        &bounded,
        &mut || Ok(stand_in_single_ep_image()),
        &config,
        false,
        None,
    )
    .unwrap();
    let elapsed = host.clock().now() - started;
    // A logic bound on simulated time, not a wall-clock threshold.
    assert!(
        elapsed <= budget::AFTER_LOCK,
        "virtual {elapsed:?} > {:?}",
        budget::AFTER_LOCK
    );
    assert!(report.outcomes[0].result.is_err() && report.outcomes[1].result.is_err());
    let world = host.world();
    let world = world.borrow();
    let running = world
        .vms
        .iter()
        .find(|v| v.uuid == vms[3])
        .map(|v| v.power_state);
    assert_eq!(
        running,
        Some(PowerState::Running),
        "the running VM still runs"
    );
}

/// A chipset whose two sides of one port carry different numbers: the boot
/// loader at `1-5`, the ready Coral at its peer `2-3`, the config naming
/// `2-3` (what XAPI showed). The boot path finds the configured Coral at
/// once through the peer instead of waiting out `--wait-device` (which holds
/// back VM auto-start) before going on.
#[test]
fn a_configured_port_whose_coral_is_at_its_peer_is_not_waited_for() {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    bus.add_coral(SimCoralConfig::at("1-5", "2-3"), CoralState::Uninitialized);
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-1");
    let vm = world.add_vm("frigate", PowerState::Halted, None);
    let host = SimulatedHost::from_parts(clock, bus, world, host_uuid);
    let config = Config {
        entries: vec![entry(&vm, "2-3")],
    };
    let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false);
    let started = host.clock().now();
    let report = up_all(
        host.bus(),
        &xe,
        host.clock(),
        &mut || Ok(stand_in_single_ep_image()),
        &config,
        false,
        None,
    )
    .unwrap();
    let took = host.clock().now() - started;
    assert!(report.outcomes[0].result.is_ok(), "the entry is recovered");
    assert!(
        took < budget::DEVICE_WAIT,
        "the boot path waited {took:?} for a Coral that was at its peer port all along"
    );
    let world = host.world();
    let world = world.borrow();
    assert_eq!(world.vusbs.len(), 1, "the VM got its VUSB");
    assert_eq!(world.vusbs[0].vm_uuid, vm);
}

//! `coral up` against the in-process simulated Coral and XAPI pool: the
//! power-loss scenarios of the issue, asserting device state, XAPI records
//! and the VM power history.

mod support;

use coral::clock::{Clock, VirtualClock};
use coral::error::NextStep;
use coral::ops::attach::AttachOptions;
use coral::ops::init::InitOutcome;
use coral::ops::up::{up, UpOptions, UpReport};
use coral::usb::{
    CoralDevice, CoralState, InterfaceInfo, ResetOutcome, UsbBus, UsbError, UsbTransport,
};
use coral::xe::client::XeClient;
use coral_testkit::device::{SimBus, SimCoralConfig};
use coral_testkit::host::{stand_in_single_ep_image, SimulatedHost};
use coral_testkit::xapi::{
    coral_bootloader_device, coral_ready_device, Outage, OutageKind, PowerState, World, WorldConfig,
};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use support::READ_COMMANDS;

struct Scenario {
    host: SimulatedHost,
    clock: Rc<VirtualClock>,
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
        host: SimulatedHost::from_parts(clock.clone(), bus, world, host_uuid),
        clock,
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
            guest_lost: false,
            intent: None,
        },
        dry_run,
        wait_device: Duration::ZERO,
    }
}

fn run_up(s: &Scenario, opts: &UpOptions, loads: &mut u32) -> anyhow::Result<UpReport> {
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), opts.dry_run);
    let mut load = || {
        *loads += 1;
        Ok(stand_in_single_ep_image())
    };
    up(s.host.bus(), &xe, s.host.clock(), &mut load, opts)
}

/// The one VUSB of the VM, checked to link the group of the ready Coral's PUSB.
fn vusb_on_ready_group(world: &World, vm_uuid: &str) -> coral_testkit::xapi::Vusb {
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
    let attach = report.attach.expect("attach ran");
    let restart_now = NextStep::RestartNow {
        vm: s.vm_uuid.clone(),
    };
    assert!(
        attach.pending_restart && attach.to_string().contains(&restart_now.to_string()),
        "says how to restart now: {attach}"
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
    assert_eq!(
        calls.len(),
        3,
        "steady state with the VM running: the VM (with its dom-id), its VUSBs, the PUSBs: {calls:?}"
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
    let summary = report.to_string();
    assert!(
        summary.starts_with(
            "up: would upload the firmware to the Coral at 1-4; would pass it through"
        ),
        "{summary}"
    );
    let planned = report
        .attach
        .expect("the VM and XAPI were checked")
        .to_string();
    assert!(planned.starts_with("would upload"), "{planned}");
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
    let mut load = || Ok(stand_in_single_ep_image());
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

fn client(s: &Scenario, dry_run: bool) -> XeClient<'_> {
    XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), dry_run)
        .waiting_for_xapi(s.host.clock(), Duration::from_secs(120))
}

fn run_up_waiting(s: &Scenario, opts: &UpOptions) -> anyhow::Result<UpReport> {
    let xe = client(s, opts.dry_run);
    let mut load = || Ok(stand_in_single_ep_image());
    up(s.host.bus(), &xe, s.host.clock(), &mut load, opts)
}

fn writes(world: &World) -> Vec<Vec<String>> {
    world
        .calls
        .iter()
        .filter(|c| !READ_COMMANDS.contains(&c.args[0].as_str()))
        .map(|c| c.args.clone())
        .collect()
}

#[test]
fn a_wrong_vm_name_fails_before_the_reset_and_a_rerun_converges() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let mut o = options(false, false);
    o.attach.vm = "frigat".into();
    let (bus, usb_log) = recorded(&s);
    let xe = client(&s, false);
    let mut load = || Ok(stand_in_single_ep_image());
    let err = up(&bus, &xe, s.host.clock(), &mut load, &o).unwrap_err();
    assert_eq!(coral::error::exit_code_of(&err), 8, "{err:#}");
    assert!(
        !usb_log.borrow().iter().any(|(_, what)| *what == "reset"),
        "the Coral is not reset for a VM that does not exist: {:?}",
        usb_log.borrow()
    );
    let corals = s.host.bus().list_corals().unwrap();
    assert_eq!(
        (corals[0].path.to_string(), corals[0].state),
        ("1-4".into(), CoralState::Uninitialized),
        "still the boot loader it was"
    );
    assert!(writes(&s.host.world().borrow()).is_empty());

    // The rerun with the right name downloads again and converges.
    run_up_waiting(&s, &options(false, false)).expect("the rerun succeeds");
    let world = s.host.world();
    let world = world.borrow();
    vusb_on_ready_group(&world, &s.vm_uuid);
    assert_eq!(
        s.host.bus().list_corals().unwrap()[0].state,
        CoralState::Ready
    );
}

/// USB writes (control OUT) and resets on the host's bus, with their time.
type UsbLog = Rc<RefCell<Vec<(Duration, &'static str)>>>;

/// The scenario's bus, logging every USB write and reset with its time.
fn recorded(s: &Scenario) -> (RecordedBus<'_>, UsbLog) {
    let log = UsbLog::default();
    let bus = RecordedBus {
        inner: s.host.bus(),
        clock: s.clock.clone(),
        log: log.clone(),
    };
    (bus, log)
}

struct RecordedBus<'h> {
    inner: &'h dyn UsbBus,
    clock: Rc<VirtualClock>,
    log: UsbLog,
}

impl UsbBus for RecordedBus<'_> {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        self.inner.list_corals()
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        Ok(Box::new(RecordedTransport {
            inner: self.inner.open(device)?,
            clock: self.clock.clone(),
            log: self.log.clone(),
        }))
    }
}

struct RecordedTransport {
    inner: Box<dyn UsbTransport>,
    clock: Rc<VirtualClock>,
    log: UsbLog,
}

impl UsbTransport for RecordedTransport {
    fn interfaces(&self) -> Result<Vec<InterfaceInfo>, UsbError> {
        self.inner.interfaces()
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        self.inner.claim_interface(number)
    }

    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
    ) -> Result<usize, UsbError> {
        self.inner
            .control_in(request_type, request, value, index, buf)
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, UsbError> {
        self.log.borrow_mut().push((self.clock.now(), "write"));
        self.inner
            .control_out(request_type, request, value, index, data)
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        self.log.borrow_mut().push((self.clock.now(), "reset"));
        self.inner.reset()
    }
}

#[test]
fn the_xapi_reads_run_beside_the_upload_and_all_checks_pass_before_the_reset() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let (bus, usb_log) = recorded(&s);
    let xe = client(&s, false);
    let mut load = || Ok(stand_in_single_ep_image());
    up(&bus, &xe, s.host.clock(), &mut load, &options(false, false)).unwrap();

    let world = s.host.world();
    let world = world.borrow();
    vusb_on_ready_group(&world, &s.vm_uuid);
    let usb_log = usb_log.borrow();
    let ms = |d: &Duration| d.as_millis() as u64;
    let first_usb_write = usb_log
        .iter()
        .find(|(_, what)| *what == "write")
        .map(|(at, _)| ms(at))
        .expect("the firmware was downloaded");
    let reset = usb_log
        .iter()
        .find(|(_, what)| *what == "reset")
        .map(|(at, _)| ms(at))
        .expect("the Coral was reset");
    let commands: Vec<&str> = world.calls.iter().map(|c| c.args[0].as_str()).collect();
    let reads = &world.calls[..3];
    let mut read_commands: Vec<&str> = reads.iter().map(|c| c.args[0].as_str()).collect();
    read_commands.sort();
    assert_eq!(
        read_commands,
        ["pusb-list", "vm-list", "vusb-list"],
        "the VM, its VUSBs and the pool's PUSBs are read first: {commands:?}"
    );
    for read in reads {
        assert!(
            read.at_ms <= first_usb_write && first_usb_write < read.at_ms + read.duration_ms,
            "{} is in flight while the firmware uploads (read {}+{} ms, first USB write at {first_usb_write} ms)",
            read.args[0],
            read.at_ms,
            read.duration_ms
        );
        assert!(
            read.at_ms + read.duration_ms <= reset,
            "{} is answered and checked before the reset at {reset} ms",
            read.args[0]
        );
    }
    let first_xapi_write = world
        .calls
        .iter()
        .find(|c| !READ_COMMANDS.contains(&c.args[0].as_str()))
        .expect("the attach wrote");
    assert!(
        first_xapi_write.at_ms >= reset,
        "no XAPI write before the checks and the reset: {commands:?}"
    );
    eprintln!("xe calls: {commands:?}");
}

#[test]
fn up_at_boot_waits_for_xapi_before_touching_the_coral() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    {
        let world = s.host.world();
        let mut world = world.borrow_mut();
        world.outages.push(Outage {
            from_ms: 0,
            until_ms: 3_000,
            kind: OutageKind::Refused,
        });
        world.outages.push(Outage {
            from_ms: 3_000,
            until_ms: 7_000,
            kind: OutageKind::StillBooting,
        });
    }
    let report = run_up_waiting(&s, &options(false, false)).expect("xapi came up in time");
    assert!(matches!(report.init, Some(InitOutcome::Initialized { .. })));
    let world = s.host.world();
    let world = world.borrow();
    vusb_on_ready_group(&world, &s.vm_uuid);
    let first_request = s.host.sim_bus().requests().len();
    assert!(first_request > 0);
}

/// A boot after a power loss: the database still holds the ready Coral's
/// PUSB, group and the VM's VUSB from before; the bus shows the boot
/// loader; xapi's start-up scan read the bus then and commits at `late_ms`.
fn stale_boot(power: PowerState, late_ms: u64, scan_read_ms: u64) -> Scenario {
    let s = scenario(CoralState::Uninitialized, power);
    {
        let world = s.host.world();
        let mut w = world.borrow_mut();
        w.config.scan_read_ms = scan_read_ms;
        let host = s.host.host_uuid().to_string();
        w.pending_scans.clear();
        let group = w.new_uuid();
        w.groups.push(coral_testkit::xapi::UsbGroup {
            uuid: group.clone(),
            name_label: "Group of 18d1 9302 USBs".into(),
            name_description: String::new(),
            other_config: Default::default(),
        });
        let pusb = w.new_uuid();
        w.pusbs.push(coral_testkit::xapi::Pusb {
            uuid: pusb,
            usb_group_uuid: group.clone(),
            host_uuid: host.clone(),
            device: coral_ready_device("2-4"),
            passthrough_enabled: true,
        });
        let vusb = w.new_uuid();
        w.vusbs.push(coral_testkit::xapi::Vusb {
            uuid: vusb,
            vm_uuid: s.vm_uuid.clone(),
            usb_group_uuid: group,
            currently_attached: false,
            other_config: Default::default(),
        });
        w.queue_scan_that_saw(&host, vec![coral_bootloader_device("1-4")], late_ms);
    }
    s
}

#[test]
fn stale_records_and_late_scans_never_leave_the_vm_without_the_coral() {
    for scan_read_ms in [0, 300] {
        for late_ms in (0..12).map(|i| 250 + i * 400) {
            let s = stale_boot(PowerState::Halted, late_ms, scan_read_ms);
            let result = run_up_waiting(&s, &options(false, false));
            s.host.clock().sleep(Duration::from_secs(120));
            let world = s.host.world();
            let world = world.borrow();
            let case = format!("late scan at {late_ms} ms, read {scan_read_ms} ms: {result:?}");
            let pusb = world
                .pusbs
                .iter()
                .find(|p| p.device.path == "2-4" && p.device.product_id == "9302")
                .unwrap_or_else(|| panic!("{case}: XAPI lists the Coral"));
            let vusbs: Vec<_> = world
                .vusbs
                .iter()
                .filter(|v| v.vm_uuid == s.vm_uuid)
                .collect();
            match &result {
                Ok(_) => {
                    assert_eq!(vusbs.len(), 1, "{case}");
                    assert_eq!(vusbs[0].usb_group_uuid, pusb.usb_group_uuid, "{case}");
                }
                Err(err) => assert!(
                    coral::error::exit_code_of(err) != 0 && vusbs.is_empty(),
                    "{case}"
                ),
            }
            result.unwrap_or_else(|e| panic!("{case}: {e:#}"));
        }
    }
}

#[test]
fn dry_run_on_a_boot_loader_checks_the_vm_and_the_pool() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let mut o = options(false, true);
    o.attach.vm = "nope".into();
    let err = run_up_waiting(&s, &o).unwrap_err();
    assert_eq!(coral::error::exit_code_of(&err), 8, "{err:#}");

    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let report = run_up_waiting(&s, &options(false, true)).unwrap();
    let world = s.host.world();
    let world = world.borrow();
    assert!(
        world.calls.iter().any(|c| c.args[0] == "vm-list"),
        "the VM was resolved"
    );
    assert!(writes(&world).is_empty(), "{:?}", writes(&world));
    assert!(
        !s.host
            .sim_bus()
            .requests()
            .iter()
            .any(|r| r.request_type == 0x21 && r.request == 1),
        "no firmware block was written"
    );
    assert!(report.to_string().contains("dry run"), "{report}");
}

#[test]
fn call_budgets_boot_with_the_vm_halted_and_steady_state() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    run_up_waiting(&s, &options(false, false)).unwrap();
    let boot = s.host.world().borrow().calls.len();
    assert!(boot <= 8, "boot with the VM halted: {boot} calls");
    let before = boot;
    run_up_waiting(&s, &options(false, false)).unwrap();
    let world = s.host.world();
    let world = world.borrow();
    let steady = &world.calls[before..];
    assert!(steady.len() <= 3, "steady state: {steady:?}");
    assert!(steady
        .iter()
        .all(|c| READ_COMMANDS.contains(&c.args[0].as_str())));
    eprintln!("xe calls: boot halted {boot}, steady {}", steady.len());
}

#[test]
fn the_boot_path_after_a_power_loss_costs_at_most_8_calls_and_reads_the_vm_once() {
    let s = scenario(CoralState::Uninitialized, PowerState::Halted);
    let config = coral::config::Config {
        entries: vec![coral::config::Entry {
            vm_uuid: s.vm_uuid.clone(),
            vm_name: String::new(),
            device: None,
            start: false,
            restart: false,
            deadlines: Default::default(),
        }],
    };
    let xe = client(&s, false);
    let report = coral::ops::boot::up_all(
        s.host.bus(),
        &xe,
        s.host.clock(),
        &mut || Ok(stand_in_single_ep_image()),
        &config,
        false,
        None,
    )
    .unwrap();
    report.into_result().expect("the entry recovered");
    let world = s.host.world();
    let world = world.borrow();
    vusb_on_ready_group(&world, &s.vm_uuid);
    let commands: Vec<&str> = world.calls.iter().map(|c| c.args[0].as_str()).collect();
    assert!(commands.len() <= 8, "boot: {commands:?}");
    assert_eq!(
        commands.iter().filter(|c| **c == "vm-list").count(),
        1,
        "the boot probe's VM read is the plan's: {commands:?}"
    );
    eprintln!("boot path xe calls: {commands:?}");
}

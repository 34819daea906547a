//! `coral watch` against the in-process simulated Coral and XAPI pool, on
//! virtual time: a Coral that falls back to its boot loader while the VM
//! runs, each power policy, the restart rate limit, a paused mapping, two
//! Corals of which one drops, and a lock held by another run. Each test
//! asserts XAPI records, the VM power history and the USB traffic.

use coral::clock::{Clock, VirtualClock};
use coral::mapping_state::StateStore;
use coral::ops::attach::AttachOptions;
use coral::ops::up::UpOptions;
use coral::ops::watch::{watch, LockAttempt, Mapping, Wake, Wakeups, WatchEnv, WatchOptions};
use coral::usb::CoralState;
use coral::xe::client::XeClient;
use coral_testkit::device::{SimBus, SimCoralConfig};
use coral_testkit::e2e::{vm_power_transitions, vusbs_on_ready_group};
use coral_testkit::host::{stand_in_single_ep_image, SimulatedHost};
use coral_testkit::xapi::{PowerState, World, WorldConfig};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// A host whose Corals (xHCI ports `ports`) are ready and each passed
/// through to its own VM `cam-<port>` in `power`, as after a good boot.
struct Scenario {
    host: SimulatedHost,
    vms: Vec<String>,
    state_dir: tempfile::TempDir,
}

fn scenario(ports: &[u8], power: PowerState) -> Scenario {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    for port in ports {
        bus.add_coral(SimCoralConfig::xhci(*port), CoralState::Ready);
    }
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-1");
    let resident = (power == PowerState::Running).then_some(host_uuid.as_str());
    let vms: Vec<String> = ports
        .iter()
        .map(|p| world.add_vm(&format!("cam-{p}"), power, resident))
        .collect();
    let host = SimulatedHost::from_parts(clock, bus, world, host_uuid);
    // Pass each Coral through, as `coral up` did at boot.
    {
        let world = host.world();
        let mut world = world.borrow_mut();
        for (port, vm) in ports.iter().zip(&vms) {
            let path = format!("2-{port}");
            let pusb = world
                .pusbs
                .iter_mut()
                .find(|p| p.device.path == path)
                .expect("XAPI lists the ready Coral");
            pusb.passthrough_enabled = true;
            let group = pusb.usb_group_uuid.clone();
            let uuid = world.new_uuid();
            world.vusbs.push(coral_testkit::xapi::Vusb {
                uuid,
                vm_uuid: vm.clone(),
                usb_group_uuid: group,
                currently_attached: power == PowerState::Running,
                other_config: Default::default(),
            });
        }
    }
    Scenario {
        host,
        vms,
        state_dir: tempfile::tempdir().unwrap(),
    }
}

fn mapping(port: u8, vm: &str, restart: bool) -> Mapping {
    Mapping {
        vm: vm.to_string(),
        name: None,
        device: Some(format!("1-{port}")),
        start: false,
        restart,
        deadlines: Default::default(),
    }
}

fn options(mappings: Vec<Mapping>, max_restarts_per_hour: u32) -> WatchOptions {
    WatchOptions {
        mappings,
        max_restarts_per_hour,
        usb_poll: Duration::from_secs(2),
        xapi_check: MINUTE,
        recovery: UpOptions {
            wait_device: Duration::ZERO,
            replug_timeout: Duration::from_secs(30),
            attach: AttachOptions {
                vm: String::new(),
                device: None,
                start: false,
                restart: false,
                force_shutdown: false,
                shutdown_timeout: Duration::from_secs(180),
                scan_timeout: Duration::from_secs(30),
                guest_lost: false,
                intent: None,
            },
            dry_run: false,
        },
    }
}

type Step = (Duration, Box<dyn Fn(&SimulatedHost)>);

/// Wake-ups from a script: at each step's time something happens on the
/// host (a Coral drops) and the watcher hears a USB event; the watch ends at `end`.
struct Script<'a> {
    host: &'a SimulatedHost,
    steps: RefCell<VecDeque<Step>>,
    end: Duration,
    wakes: Cell<u32>,
    /// SIGHUPs: when, and what the config then reads.
    reloads: RefCell<VecDeque<(Duration, Reloaded)>>,
    reloaded: RefCell<Option<Result<Vec<Mapping>, String>>>,
}

/// What the config reads at a SIGHUP (Err: a broken config, its error line).
type Reloaded = Result<Vec<Mapping>, String>;

/// More wake-ups than any story here needs: the watcher spins.
const SPINNING: u32 = 100_000;

impl<'a> Script<'a> {
    fn new(host: &'a SimulatedHost, steps: Vec<Step>, end: Duration) -> Self {
        Script {
            host,
            steps: RefCell::new(steps.into()),
            end,
            wakes: Cell::new(0),
            reloads: RefCell::new(VecDeque::new()),
            reloaded: RefCell::new(None),
        }
    }

    /// A SIGHUP at `at`, after which the config reads `config`.
    fn reload_at(self, at: Duration, config: Result<Vec<Mapping>, String>) -> Self {
        self.reloads.borrow_mut().push_back((at, config));
        self
    }
}

impl Wakeups for Script<'_> {
    fn wait(&self, timeout: Duration) -> Wake {
        self.wakes.set(self.wakes.get() + 1);
        assert!(self.wakes.get() < SPINNING, "the watcher spins");
        let clock = self.host.clock();
        let now = clock.now();
        let reload_due = self
            .reloads
            .borrow()
            .front()
            .is_some_and(|(at, _)| *at <= now + timeout);
        if reload_due {
            let (at, config) = self.reloads.borrow_mut().pop_front().unwrap();
            clock.sleep(at.saturating_sub(now));
            *self.reloaded.borrow_mut() = Some(config);
            return Wake::Reload;
        }
        let due = self
            .steps
            .borrow()
            .front()
            .is_some_and(|(at, _)| *at <= now + timeout);
        if due {
            let (at, action) = self.steps.borrow_mut().pop_front().unwrap();
            clock.sleep(at.saturating_sub(now));
            action(self.host);
            return Wake::UsbChanged;
        }
        if now + timeout >= self.end {
            clock.sleep(self.end.saturating_sub(now));
            return Wake::Stop;
        }
        clock.sleep(timeout);
        Wake::Timeout
    }

    fn reload(&self) -> anyhow::Result<Vec<Mapping>> {
        match self.reloaded.borrow_mut().take() {
            Some(Ok(mappings)) => Ok(mappings),
            Some(Err(line)) => Err(anyhow::anyhow!("{line}")),
            None => Err(anyhow::anyhow!("no reload was scripted")),
        }
    }
}

/// The host's virtual clock, on which a stop (SIGTERM) arrives at `stop_at`:
/// the watcher's lifetime, as `watch_runtime` owns it on a real host.
struct StopAt<'a> {
    clock: &'a dyn Clock,
    stop_at: Duration,
}

impl Clock for StopAt<'_> {
    fn now(&self) -> Duration {
        self.clock.now()
    }
    fn sleep(&self, duration: Duration) {
        self.clock.sleep(duration)
    }
    fn stop_requested(&self) -> bool {
        self.clock.now() >= self.stop_at
    }
}

/// Coral `index` browns out: it comes back as its boot loader.
fn drop_coral(index: usize) -> Box<dyn Fn(&SimulatedHost)> {
    Box::new(move |host: &SimulatedHost| {
        host.sim_bus().replug(index);
        host.udev_event();
    })
}

/// Run the watcher over `script` with the lock free unless `lock_busy_until`.
fn run_watch(s: &Scenario, opts: &WatchOptions, script: &Script, lock_busy_until: Duration) -> u32 {
    run_watch_until_stop(s, opts, script, lock_busy_until, Duration::MAX)
}

/// [`run_watch`], with a stop (SIGTERM) at `stop_at`: the script ends at it
/// too (the signal also wakes the watcher).
fn run_watch_until_stop(
    s: &Scenario,
    opts: &WatchOptions,
    script: &Script,
    lock_busy_until: Duration,
    stop_at: Duration,
) -> u32 {
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    let loads = Cell::new(0);
    let mut load = || {
        loads.set(loads.get() + 1);
        Ok(stand_in_single_ep_image())
    };
    let state = StateStore::in_dir(s.state_dir.path());
    let stoppable = StopAt {
        clock: s.host.clock(),
        stop_at,
    };
    let clock: &dyn Clock = &stoppable;
    let lock = || {
        Ok(if clock.now() < lock_busy_until {
            LockAttempt::Busy
        } else {
            LockAttempt::Held(None)
        })
    };
    let mut env = WatchEnv {
        usb: s.host.bus(),
        xe: &xe,
        clock,
        load_firmware: &mut load,
        lock: &lock,
        state: &state,
    };
    watch(&mut env, script, opts);
    loads.get()
}

/// The VM's VUSBs, each as (on the ready Coral's current group, attached).
fn vusbs_of(s: &Scenario, vm: &str, ready_path: &str) -> Vec<(bool, bool)> {
    let world = s.host.world();
    let world = world.borrow();
    vusbs_on_ready_group(&world, s.host.host_uuid(), vm, ready_path)
}

/// The VM's power transitions so far, as (from, to).
fn transitions(s: &Scenario, vm: &str) -> Vec<(PowerState, PowerState)> {
    vm_power_transitions(&s.host.world().borrow(), vm)
}

fn coral_states(s: &Scenario) -> Vec<(String, CoralState)> {
    s.host
        .bus()
        .list_corals()
        .unwrap()
        .into_iter()
        .map(|c| (c.path.to_string(), c.state))
        .collect()
}

#[test]
fn a_coral_that_drops_while_its_vm_is_halted_is_reinitialized_and_reattached_without_a_restart() {
    let s = scenario(&[4], PowerState::Halted);
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 3 * MINUTE);
    let loads = run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(loads, 1, "firmware loaded for the one recovery");
    assert_eq!(coral_states(&s), vec![("2-4".into(), CoralState::Ready)]);
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, false)]);
    assert!(
        transitions(&s, &s.vms[0]).is_empty(),
        "a halted VM is not started"
    );
    let states = StateStore::in_dir(s.state_dir.path()).load().unwrap();
    let last = &states.mappings[&s.vms[0]];
    assert_eq!(last.last_action_ok, Some(true));
    assert!(
        last.last_action
            .as_deref()
            .unwrap()
            .contains("firmware uploaded"),
        "{last:?}"
    );
}

#[test]
fn a_running_vm_is_restarted_once_when_its_mapping_allows_it() {
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 5 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, true)]);
    assert_eq!(
        transitions(&s, &s.vms[0]),
        vec![
            (PowerState::Running, PowerState::Halted),
            (PowerState::Halted, PowerState::Running)
        ]
    );
}

#[test]
fn a_running_vm_is_never_restarted_when_its_mapping_does_not_allow_it() {
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], false)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 5 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    // The VUSB is back on the new group, attached at the VM's next start.
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, false)]);
    assert!(transitions(&s, &s.vms[0]).is_empty());
    let world = s.host.world();
    assert!(
        !world
            .borrow()
            .calls
            .iter()
            .any(|c| c.args[0] == "vm-shutdown"),
        "no shutdown was even tried"
    );
}

#[test]
fn restarts_stop_at_the_hourly_limit_and_resume_after_the_hour() {
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], true)], 1);
    let script = Script::new(
        &s.host,
        vec![
            (MINUTE, drop_coral(0)),
            (10 * MINUTE, drop_coral(0)),
            (70 * MINUTE, drop_coral(0)),
        ],
        80 * MINUTE,
    );
    run_watch(&s, &opts, &script, Duration::ZERO);

    // Minute 1: restarted. Minute 10: over the limit, so the VM runs on
    // without the Coral (pending restart). Minute 61: the first restart has
    // left the window, and the periodic check restarts the pending VM.
    // Minute 70: over the limit again; the VM waits for its next start.
    let world = s.host.world();
    let shutdowns: Vec<u64> = world
        .borrow()
        .power_history
        .iter()
        .filter(|e| e.vm_uuid == s.vms[0] && e.from == PowerState::Running)
        .map(|e| e.at_ms / 60_000)
        .collect();
    assert_eq!(shutdowns, vec![1, 61]);
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, false)]);
    let states = StateStore::in_dir(s.state_dir.path()).load().unwrap();
    let last = states.mappings[&s.vms[0]].last_action.clone().unwrap();
    assert!(last.contains("pending restart"), "{last}");
}

#[test]
fn a_mapping_paused_by_detach_is_left_alone_and_resumes_when_unpaused() {
    let s = scenario(&[4], PowerState::Halted);
    let store = StateStore::in_dir(s.state_dir.path());
    store.set_paused(&s.vms[0], "cam-4", true).unwrap();
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 3 * MINUTE);
    let loads = run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(loads, 0);
    assert_eq!(
        coral_states(&s),
        vec![("1-4".into(), CoralState::Uninitialized)]
    );
    assert!(
        s.host.sim_bus().requests().is_empty(),
        "no USB request at all"
    );

    store.set_paused(&s.vms[0], "cam-4", false).unwrap();
    let script = Script::new(&s.host, vec![], 6 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);
    assert_eq!(coral_states(&s), vec![("2-4".into(), CoralState::Ready)]);
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, false)]);
}

#[test]
fn of_two_corals_only_the_one_that_dropped_is_touched() {
    let s = scenario(&[4, 5], PowerState::Halted);
    let opts = options(
        vec![mapping(4, &s.vms[0], false), mapping(5, &s.vms[1], false)],
        2,
    );
    let before: Vec<_> = {
        let world = s.host.world();
        let world = world.borrow();
        world
            .vusbs
            .iter()
            .filter(|v| v.vm_uuid == s.vms[1])
            .map(|v| v.uuid.clone())
            .collect()
    };
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 3 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(
        coral_states(&s),
        vec![
            ("2-4".into(), CoralState::Ready),
            ("2-5".into(), CoralState::Ready)
        ]
    );
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, false)]);
    let world = s.host.world();
    let world = world.borrow();
    let after: Vec<_> = world
        .vusbs
        .iter()
        .filter(|v| v.vm_uuid == s.vms[1])
        .map(|v| v.uuid.clone())
        .collect();
    assert_eq!(before, after, "the other Coral's VUSB is the same record");
    let coral_5_requests = s
        .host
        .sim_bus()
        .requests()
        .iter()
        .filter(|r| r.request == 1)
        .count();
    assert_eq!(
        coral_5_requests, 44,
        "one download (to the Coral that dropped)"
    );
}

#[test]
fn a_recovery_waits_while_another_coral_run_holds_the_lock() {
    let s = scenario(&[4], PowerState::Halted);
    let opts = options(vec![mapping(4, &s.vms[0], false)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 5 * MINUTE);
    let busy_until = 2 * MINUTE;
    run_watch(&s, &opts, &script, busy_until);

    assert_eq!(coral_states(&s), vec![("2-4".into(), CoralState::Ready)]);
    let first_usb_request = s.host.sim_bus().requests().len();
    assert!(first_usb_request > 0);
    let world = s.host.world();
    let world = world.borrow();
    let first_write = world
        .calls
        .iter()
        .find(|c| c.args[0] == "vusb-create")
        .expect("the VUSB was created after the lock was released");
    assert!(
        Duration::from_millis(first_write.at_ms) >= busy_until,
        "no write while the lock was held: {first_write:?}"
    );
}

#[test]
fn an_idle_watch_makes_no_xe_call_between_its_periodic_checks() {
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], false)], 2);
    let script = Script::new(&s.host, vec![], 10 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    let world = s.host.world();
    let world = world.borrow();
    let calls = world.calls.len();
    // Resolve the VM once, then at most 3 reads per check: at start and every minute.
    assert!(calls <= 1 + 3 * 11, "{calls} calls: {:?}", world.calls);
    assert!(
        world
            .calls
            .iter()
            .all(|c| c.args[0].ends_with("-list") || c.args[0].ends_with("-get")),
        "reads only"
    );
    assert!(s.host.sim_bus().requests().is_empty());
}

#[test]
fn a_scan_that_lands_after_the_usb_event_is_caught_by_the_settle_recheck() {
    // A ready Coral resets and keeps its firmware (libedgetpu and XAPI reset
    // it on every open and VM start): udev reports it gone and back, and
    // XAPI's scan of the gap deletes its PUSB, group and VUSB — but only
    // 500 ms after the watcher already looked and found them.
    let s = scenario(&[4], PowerState::Halted);
    let opts = options(vec![mapping(4, &s.vms[0], false)], 2);
    let host_uuid = s.host.host_uuid().to_string();
    let reset_keeping_firmware: Box<dyn Fn(&SimulatedHost)> = Box::new(move |host| {
        let now = host.clock().now();
        let world = host.world();
        let mut world = world.borrow_mut();
        world.set_usb_devices(&host_uuid, vec![], now);
        world.set_usb_devices(
            &host_uuid,
            vec![coral_testkit::xapi::coral_ready_device("2-4")],
            now + Duration::from_millis(5),
        );
    });
    // At 30 s, half-way to the periodic check; the watch ends at 50 s.
    let script = Script::new(
        &s.host,
        vec![(MINUTE / 2, reset_keeping_firmware)],
        MINUTE - MINUTE / 6,
    );
    let loads = run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(loads, 0, "no firmware needed: the Coral kept it");
    assert!(s.host.sim_bus().requests().is_empty());
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, false)]);
    let world = s.host.world();
    let world = world.borrow();
    let created = world
        .calls
        .iter()
        .find(|c| c.args[0] == "vusb-create")
        .expect("the VUSB was recreated");
    assert!(
        created.at_ms < (MINUTE - MINUTE / 6).as_millis() as u64,
        "within the settle recheck, not at the next periodic check: {created:?}"
    );
}

// -- the watcher's lifetime: stops, reloads, budgets, backoff ----------------

/// The VM's power state now.
fn power_of(s: &Scenario, vm: &str) -> PowerState {
    let world = s.host.world();
    let world = world.borrow();
    world.vms.iter().find(|v| v.uuid == vm).unwrap().power_state
}

/// `xe` calls that change something, at or after `from`.
fn writes_since(s: &Scenario, from: Duration) -> Vec<String> {
    let world = s.host.world();
    let world = world.borrow();
    world
        .calls
        .iter()
        .filter(|c| Duration::from_millis(c.at_ms) >= from)
        .filter(|c| !(c.args[0].ends_with("-list") || c.args[0].ends_with("-get")))
        .map(|c| c.args[0].clone())
        .collect()
}

#[test]
fn a_stop_during_a_restarts_clean_shutdown_follows_it_to_its_end_and_starts_the_vm() {
    // The guest needs 200 s to shut down: `xe vm-shutdown` gives up at 180 s
    // and xapi goes on. SIGTERM arrives 60 s into the shutdown.
    let s = scenario(&[4], PowerState::Running);
    s.host.world().borrow_mut().config.shutdown_ms = 200_000;
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let stop_at = 2 * MINUTE;
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], stop_at);
    run_watch_until_stop(&s, &opts, &script, Duration::ZERO, stop_at);
    let ended = s.host.clock().now();
    assert!(
        ended <= stop_at + coral::ops::watch::STOP_BUDGET,
        "within TimeoutStopSec: {ended:?}"
    );
    // Whatever xapi still had to do is done by now: nothing is left pending.
    s.host.clock().sleep(30 * MINUTE);

    assert_eq!(power_of(&s, &s.vms[0]), PowerState::Running);
    assert_eq!(
        transitions(&s, &s.vms[0]),
        coral_testkit::e2e::ONE_RESTART.to_vec(),
        "the shutdown was followed and the VM started with its Coral"
    );
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, true)]);
}

#[test]
fn a_stop_before_a_recovery_begins_ends_the_watch_at_once_and_touches_nothing() {
    // The Coral drops to its boot loader and SIGTERM comes in the same instant.
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let stop_at = MINUTE;
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 10 * MINUTE);
    let loads = run_watch_until_stop(&s, &opts, &script, Duration::ZERO, stop_at);

    assert_eq!(loads, 0);
    assert!(s.host.sim_bus().requests().is_empty(), "no USB request");
    assert!(writes_since(&s, Duration::ZERO).is_empty(), "no xe write");
    assert!(s.host.clock().now() - stop_at <= Duration::from_secs(1));
    s.host.clock().sleep(30 * MINUTE);
    assert_eq!(power_of(&s, &s.vms[0]), PowerState::Running);
}

#[test]
fn a_stop_after_the_vusb_begins_no_shutdown_and_a_rerun_converges() {
    // SIGTERM lands while the recovery waits for XAPI's scan: the VUSB is
    // not created, no shutdown begins, the VM runs on; a new watcher finishes.
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let stop_at = MINUTE + Duration::from_millis(1_500);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 10 * MINUTE);
    run_watch_until_stop(&s, &opts, &script, Duration::ZERO, stop_at);
    s.host.clock().sleep(MINUTE);

    assert_eq!(power_of(&s, &s.vms[0]), PowerState::Running);
    assert!(transitions(&s, &s.vms[0]).is_empty(), "no shutdown began");
    assert!(
        !writes_since(&s, stop_at)
            .iter()
            .any(|w| w.starts_with("vm-")),
        "{:?}",
        writes_since(&s, stop_at)
    );
    let script = Script::new(&s.host, vec![], 20 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);
    assert_eq!(vusbs_of(&s, &s.vms[0], "2-4"), vec![(true, true)]);
    assert_eq!(power_of(&s, &s.vms[0]), PowerState::Running);
}

#[test]
fn the_restart_budget_counts_every_shutdown_begun_even_when_the_start_with_the_coral_fails() {
    // Every start with the Coral fails twice; the third start (without it) works.
    let s = scenario(&[4], PowerState::Running);
    {
        let world = s.host.world();
        let mut world = world.borrow_mut();
        for cycle in 0..40u32 {
            for n in [3 * cycle + 1, 3 * cycle + 2] {
                world.faults.push(coral_testkit::xapi::Fault::nth(
                    "vm-start",
                    n,
                    coral_testkit::xapi::FaultKind::fail("INTERNAL_ERROR", &["usb reset failed"]),
                ));
            }
        }
    }
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 61 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    let world = s.host.world();
    let shutdowns = world
        .borrow()
        .calls
        .iter()
        .filter(|c| c.args[0] == "vm-shutdown")
        .count();
    assert!(
        shutdowns <= 2,
        "{shutdowns} shutdowns within the hour, budget 2"
    );
    assert_eq!(
        power_of(&s, &s.vms[0]),
        PowerState::Running,
        "never left down"
    );
}

#[test]
fn a_vm_whose_shutdown_outlived_its_follow_up_is_started_when_it_halts() {
    // The guest takes 400 s to shut down: more than the 180 s deadline and
    // the 120 s follow-up. It halts later; coral halted it, so coral starts it.
    let s = scenario(&[4], PowerState::Running);
    s.host.world().borrow_mut().config.shutdown_ms = 400_000;
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, drop_coral(0))], 20 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(power_of(&s, &s.vms[0]), PowerState::Running);
    assert_eq!(
        transitions(&s, &s.vms[0]),
        coral_testkit::e2e::ONE_RESTART.to_vec()
    );
    let states = StateStore::in_dir(s.state_dir.path()).load().unwrap();
    let last = states.mappings[&s.vms[0]].last_action.clone().unwrap();
    assert!(last.contains("started it again"), "{last}");
}

/// A USB bus whose listings always fail (libusb cannot start, a flaky hub).
struct FailingBus {
    listings: Cell<u32>,
}

impl coral::usb::UsbBus for FailingBus {
    fn list_corals(&self) -> Result<Vec<coral::usb::CoralDevice>, coral::usb::UsbError> {
        self.listings.set(self.listings.get() + 1);
        Err(coral::usb::UsbError::Timeout)
    }
    fn open(
        &self,
        _device: &coral::usb::CoralDevice,
    ) -> Result<Box<dyn coral::usb::UsbTransport>, coral::usb::UsbError> {
        Err(coral::usb::UsbError::NoDevice)
    }
}

#[test]
fn failing_usb_listings_back_off_instead_of_spinning() {
    let s = scenario(&[4], PowerState::Running);
    let opts = options(vec![mapping(4, &s.vms[0], false)], 2);
    let script = Script::new(&s.host, vec![], 30 * MINUTE);
    let bus = FailingBus {
        listings: Cell::new(0),
    };
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    let state = StateStore::in_dir(s.state_dir.path());
    let lock = || Ok(LockAttempt::Held(None));
    let mut load = || Ok(stand_in_single_ep_image());
    let mut env = WatchEnv {
        usb: &bus,
        xe: &xe,
        clock: s.host.clock(),
        load_firmware: &mut load,
        lock: &lock,
        state: &state,
    };
    watch(&mut env, &script, &opts);

    // 30 minutes: 2, 4, ... 60 s apart, then every 60 s: about 35 listings.
    let listings = bus.listings.get();
    assert!(listings <= 40, "{listings} listings in 30 virtual minutes");
    assert!(script.wakes.get() <= 40, "{} wake-ups", script.wakes.get());
}

#[test]
fn a_reload_takes_the_new_mappings_and_a_broken_config_keeps_the_old_ones() {
    let s = scenario(&[4, 5], PowerState::Halted);
    let first = vec![mapping(4, &s.vms[0], false)];
    let both = vec![mapping(4, &s.vms[0], false), mapping(5, &s.vms[1], false)];
    let opts = options(first, 2);
    // Minute 2: a broken config (kept: cam-5 is not watched). Minute 3: the
    // Coral of cam-5 drops, unwatched. Minute 4: a good config adds cam-5.
    let script = Script::new(&s.host, vec![(3 * MINUTE, drop_coral(1))], 8 * MINUTE)
        .reload_at(
            2 * MINUTE,
            Err("/etc/coral/coral.toml:7: bad value for `restart`".into()),
        )
        .reload_at(4 * MINUTE, Ok(both));
    run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(
        coral_states(&s),
        vec![
            ("2-4".into(), CoralState::Ready),
            ("2-5".into(), CoralState::Ready)
        ]
    );
    assert_eq!(vusbs_of(&s, &s.vms[1], "2-5"), vec![(true, false)]);
    let world = s.host.world();
    let world = world.borrow();
    let recreated = world
        .calls
        .iter()
        .find(|c| c.args[0] == "vusb-create")
        .expect("cam-5's VUSB was recreated");
    assert!(
        Duration::from_millis(recreated.at_ms) >= 4 * MINUTE,
        "only after the good reload: {recreated:?}"
    );
}

// --- A Coral that re-enumerates as itself (xapi-usb.md, "A drop that XAPI
// does not see"). XAPI's scan reads the bus when its thread runs, here
// 200 ms after the udev event, so a Coral back within 50 ms keeps its PUSB,
// group and attached VUSB while the guest has lost it.

/// Time from a scan's start to its reading of the bus, longer than the drop.
const SCAN_READ_MS: u64 = 200;
/// How long the Coral is off the bus in a link drop.
const LINK_GAP: Duration = Duration::from_millis(50);

/// `cam-4` holds the ready Coral at 2-4 and was started with it through
/// XAPI (so the simulator's usb_reset marked the node for its domain).
fn started_scenario() -> Scenario {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Ready);
    let mut world = World::new(WorldConfig {
        scan_read_ms: SCAN_READ_MS,
        ..WorldConfig::default()
    });
    let host_uuid = world.add_host("xcp-1");
    let vm = world.add_vm("cam-4", PowerState::Halted, None);
    let host = SimulatedHost::from_parts(clock, bus, world, host_uuid);
    {
        let world = host.world();
        let mut world = world.borrow_mut();
        let pusb = world
            .pusbs
            .iter_mut()
            .find(|p| p.device.path == "2-4")
            .expect("XAPI lists the ready Coral");
        pusb.passthrough_enabled = true;
        let group = pusb.usb_group_uuid.clone();
        let uuid = world.new_uuid();
        world.vusbs.push(coral_testkit::xapi::Vusb {
            uuid,
            vm_uuid: vm.clone(),
            usb_group_uuid: group,
            currently_attached: false,
            other_config: Default::default(),
        });
    }
    let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false);
    xe.vm_start(&vm).expect("the VM starts with its Coral");
    host.world().borrow_mut().power_history.clear();
    Scenario {
        host,
        vms: vec![vm],
        state_dir: tempfile::tempdir().unwrap(),
    }
}

/// Coral `index` drops off the bus and is back as itself 50 ms later at the
/// same port (new device number); udev reports both, each with its scan.
fn link_drop(index: usize) -> Box<dyn Fn(&SimulatedHost)> {
    Box::new(move |host: &SimulatedHost| {
        host.sim_bus().link_drop(index, LINK_GAP);
        host.udev_event();
        host.clock().sleep(LINK_GAP);
        host.udev_event();
    })
}

/// The Coral's PUSB uuid and the VM's VUSBs (uuid, attached).
fn records(s: &Scenario) -> (Vec<String>, Vec<(String, bool)>) {
    let world = s.host.world();
    let world = world.borrow();
    (
        world.pusbs.iter().map(|p| p.uuid.clone()).collect(),
        world
            .vusbs
            .iter()
            .filter(|v| v.vm_uuid == s.vms[0])
            .map(|v| (v.uuid.clone(), v.currently_attached))
            .collect(),
    )
}

fn last_action(s: &Scenario) -> String {
    let states = StateStore::in_dir(s.state_dir.path()).load().unwrap();
    states.mappings[&s.vms[0]]
        .last_action
        .clone()
        .unwrap_or_default()
}

const ONE_RESTART: [(PowerState, PowerState); 2] = [
    (PowerState::Running, PowerState::Halted),
    (PowerState::Halted, PowerState::Running),
];

#[test]
fn a_coral_that_reenumerates_as_itself_under_a_running_vm_costs_one_restart_when_allowed() {
    let s = started_scenario();
    let before = records(&s);
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, link_drop(0))], 5 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    // XAPI never saw it: same PUSB and VUSB, attached all along.
    assert_eq!(records(&s), before);
    assert_eq!(transitions(&s, &s.vms[0]), ONE_RESTART.to_vec());
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    let status = coral::ops::status::status(s.host.bus(), Some(&xe)).unwrap();
    assert_eq!(
        status.corals[0].guest_node.as_deref(),
        Some("given"),
        "after the restart QEMU holds the new node"
    );
}

#[test]
fn a_coral_that_reenumerates_as_itself_is_named_in_one_line_when_restarts_are_not_allowed() {
    let s = started_scenario();
    let before = records(&s);
    let opts = options(vec![mapping(4, &s.vms[0], false)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, link_drop(0))], 5 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(records(&s), before);
    assert!(transitions(&s, &s.vms[0]).is_empty());
    let line = last_action(&s);
    // (The CLI words the next step: `coral attach --vm X --restart`, see e2e_watch.)
    for part in [
        s.vms[0].as_str(),
        "2-4",
        "re-enumerated",
        "restarts not allowed",
        "RestartNow",
    ] {
        assert!(line.contains(part), "{part:?} in {line}");
    }

    // status and doctor's source of truth: the stateless check says lost.
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    let status = coral::ops::status::status(s.host.bus(), Some(&xe)).unwrap();
    assert_eq!(status.corals[0].guest_node.as_deref(), Some("lost"));
    assert!(status.render_table().contains("lost its Coral"));

    // The command the line names restarts it, once.
    let mut attach_opts = options(Vec::new(), 2).recovery.attach;
    attach_opts.vm = s.vms[0].clone();
    let report = coral::ops::attach::attach(s.host.bus(), &xe, s.host.clock(), &attach_opts)
        .expect("without --restart: exit 0");
    assert!(report.pending_restart && report.guest_lost, "{report}");
    assert!(transitions(&s, &s.vms[0]).is_empty());
    attach_opts.restart = true;
    let report = coral::ops::attach::attach(s.host.bus(), &xe, s.host.clock(), &attach_opts)
        .expect("attach --restart");
    assert!(report.restarted, "{report}");
    assert_eq!(transitions(&s, &s.vms[0]), ONE_RESTART.to_vec());
    assert_eq!(records(&s), before, "the same records, attached again");
    let status = coral::ops::status::status(s.host.bus(), Some(&xe)).unwrap();
    assert_eq!(status.corals[0].guest_node.as_deref(), Some("given"));
}

#[test]
fn reenumerations_as_itself_restart_within_the_budget_only() {
    let s = started_scenario();
    let opts = options(vec![mapping(4, &s.vms[0], true)], 1);
    let script = Script::new(
        &s.host,
        vec![(MINUTE, link_drop(0)), (10 * MINUTE, link_drop(0))],
        20 * MINUTE,
    );
    run_watch(&s, &opts, &script, Duration::ZERO);

    assert_eq!(
        transitions(&s, &s.vms[0]),
        ONE_RESTART.to_vec(),
        "the second drop is over the limit of 1 per hour"
    );
    let line = last_action(&s);
    assert!(
        line.contains("restart limit of 1 per hour reached") && line.contains("lost its Coral"),
        "{line}"
    );
}

#[test]
fn a_watcher_started_after_the_drop_finds_it_by_the_qemu_marks() {
    let s = started_scenario();
    // The drop happens before the watcher runs (no memory of it).
    link_drop(0)(&s.host);
    s.host.clock().sleep(Duration::from_secs(2));
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, Vec::new(), 3 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);
    assert_eq!(transitions(&s, &s.vms[0]), ONE_RESTART.to_vec());
}

#[test]
fn a_running_vm_whose_coral_never_reenumerated_is_left_alone() {
    let s = started_scenario();
    let opts = options(vec![mapping(4, &s.vms[0], true)], 2);
    let script = Script::new(&s.host, Vec::new(), 10 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);
    assert!(transitions(&s, &s.vms[0]).is_empty());
}

#[test]
fn up_restarts_a_vm_that_lost_its_coral_only_with_restart() {
    let s = started_scenario();
    link_drop(0)(&s.host);
    s.host.clock().sleep(Duration::from_secs(2));
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    let mut load = || Ok(stand_in_single_ep_image());
    let mut up_opts = options(Vec::new(), 2).recovery;
    up_opts.attach.vm = s.vms[0].clone();
    let report = coral::ops::up::up(s.host.bus(), &xe, s.host.clock(), &mut load, &up_opts)
        .expect("without --restart: exit 0");
    let attach = report.attach.expect("an attach report");
    assert!(attach.guest_lost && attach.pending_restart, "{attach}");
    assert!(transitions(&s, &s.vms[0]).is_empty());

    up_opts.attach.restart = true;
    let report = coral::ops::up::up(s.host.bus(), &xe, s.host.clock(), &mut load, &up_opts)
        .expect("up --restart");
    assert!(report.attach.is_some_and(|a| a.restarted));
    assert_eq!(transitions(&s, &s.vms[0]), ONE_RESTART.to_vec());
}

#[test]
fn a_vm_restarted_by_hand_after_a_drop_is_not_restarted_again_when_the_budget_returns() {
    let s = started_scenario();
    let vm = s.vms[0].clone();
    let by_hand: Box<dyn Fn(&SimulatedHost)> = Box::new(move |host: &SimulatedHost| {
        let xe = XeClient::new(host.xe(), host.host_uuid().to_string(), false);
        xe.vm_shutdown(&vm, false, Duration::from_secs(180))
            .unwrap();
        xe.vm_start(&vm).unwrap();
    });
    let opts = options(vec![mapping(4, &s.vms[0], true)], 1);
    let script = Script::new(
        &s.host,
        vec![
            (MINUTE, link_drop(0)),
            (5 * MINUTE, link_drop(0)),
            (6 * MINUTE, by_hand),
        ],
        70 * MINUTE,
    );
    run_watch(&s, &opts, &script, Duration::ZERO);
    let world = s.host.world();
    let shutdowns: Vec<u64> = world
        .borrow()
        .power_history
        .iter()
        .filter(|e| e.vm_uuid == s.vms[0] && e.from == PowerState::Running)
        .map(|e| e.at_ms / 60_000)
        .collect();
    assert_eq!(
        shutdowns,
        vec![1, 6],
        "the watcher's restart at minute 1 and the admin's at minute 6; none when the budget returns at 61"
    );
}

#[test]
fn a_link_drop_while_the_vm_is_halted_costs_nothing_and_its_next_start_gets_the_new_node() {
    let s = started_scenario();
    let vm = s.vms[0].clone();
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    xe.vm_shutdown(&vm, false, Duration::from_secs(180))
        .unwrap();
    s.host.world().borrow_mut().power_history.clear();
    let opts = options(vec![mapping(4, &vm, true)], 2);
    let script = Script::new(&s.host, vec![(MINUTE, link_drop(0))], 5 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);
    assert!(
        transitions(&s, &vm).is_empty(),
        "a halted VM is not started"
    );

    xe.vm_start(&vm).unwrap();
    let status = coral::ops::status::status(s.host.bus(), Some(&xe)).unwrap();
    assert_eq!(status.corals[0].guest_node.as_deref(), Some("given"));
    // The watcher, started again now, has nothing to do.
    let script = Script::new(&s.host, Vec::new(), 10 * MINUTE);
    run_watch(&s, &opts, &script, Duration::ZERO);
    assert_eq!(
        transitions(&s, &vm),
        vec![(PowerState::Halted, PowerState::Running)]
    );
}

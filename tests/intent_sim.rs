//! The write-ahead restart intent, against the in-process simulators: a run
//! killed between a VM's shutdown and its start (SIGKILL, a crash) leaves
//! the VM halted with its VUSB; the next `coral watch` or `coral up` finds
//! the intent and starts it. A VM the user halted (no intent) stays halted,
//! and a truncated state file loses its intents (kept aside).

use coral::clock::{Clock, VirtualClock};
use coral::mapping_state::StateStore;
use coral::ops::attach::{attach, AttachOptions};
use coral::ops::unfinished::{finish_unfinished, Finished};
use coral::ops::up::{up, UpOptions};
use coral::ops::watch::{watch, LockAttempt, Mapping, Wake, Wakeups, WatchEnv, WatchOptions};
use coral::usb::CoralState;
use coral::xe::client::XeClient;
use coral::xe::{StartedCall, XeError, XeRunner};
use coral_testkit::device::{SimBus, SimCoralConfig};
use coral_testkit::e2e::{vm_power_transitions, vusbs_on_ready_group, ONE_RESTART};
use coral_testkit::host::{stand_in_single_ep_image, SimulatedHost};
use coral_testkit::xapi::{PowerState, World, WorldConfig};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// A host with a ready Coral at 2-4 and a VM "cam" in `power`, without
/// any VUSB (a running VM gets the Coral only by a restart).
struct Scenario {
    host: SimulatedHost,
    vm: String,
    state_dir: tempfile::TempDir,
}

fn scenario(power: PowerState) -> Scenario {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    bus.add_coral(SimCoralConfig::xhci(4), CoralState::Ready);
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-1");
    let resident = (power == PowerState::Running).then_some(host_uuid.as_str());
    let vm = world.add_vm("cam", power, resident);
    Scenario {
        host: SimulatedHost::from_parts(clock, bus, world, host_uuid),
        vm,
        state_dir: tempfile::tempdir().unwrap(),
    }
}

impl Scenario {
    fn store(&self) -> StateStore {
        StateStore::in_dir(self.state_dir.path())
    }

    fn transitions(&self, vm: &str) -> Vec<(PowerState, PowerState)> {
        vm_power_transitions(&self.host.world().borrow(), vm)
    }

    fn power(&self, vm: &str) -> PowerState {
        self.host.world().borrow().vm(vm).unwrap().power_state
    }

    /// The VM's VUSBs as (on the ready Coral's group, attached).
    fn vusbs(&self) -> Vec<(bool, bool)> {
        let world = self.host.world();
        let world = world.borrow();
        vusbs_on_ready_group(&world, self.host.host_uuid(), &self.vm, "2-4")
    }

    fn intents(&self) -> Vec<String> {
        self.store()
            .intents()
            .into_iter()
            .map(|(vm, _)| vm)
            .collect()
    }
}

/// The simulated `xe`, except that the process is killed (a panic that
/// unwinds out of the run) when it is about to send `vm-start`: a coral run
/// SIGKILLed between the shutdown it began and the start.
struct KilledAtStart<'a> {
    inner: &'a dyn XeRunner,
}

impl XeRunner for KilledAtStart<'_> {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        if args.first().is_some_and(|c| c == "vm-start") {
            panic!("SIGKILL: the coral run dies before `xe vm-start`");
        }
        self.inner.run(args, timeout)
    }

    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        self.inner.start(args, timeout)
    }
}

fn attach_options(vm: &str, restart: bool, intent: Option<StateStore>) -> AttachOptions {
    AttachOptions {
        vm: vm.to_string(),
        device: Some("1-4".into()),
        start: false,
        restart,
        force_shutdown: false,
        shutdown_timeout: Duration::from_secs(180),
        scan_timeout: Duration::from_secs(30),
        guest_lost: false,
        intent,
    }
}

fn watch_options(vm: &str, restart: bool) -> WatchOptions {
    WatchOptions {
        mappings: vec![Mapping {
            vm: vm.to_string(),
            name: None,
            device: Some("1-4".into()),
            start: false,
            restart,
            deadlines: Default::default(),
        }],
        max_restarts_per_hour: 2,
        usb_poll: Duration::from_secs(2),
        xapi_check: MINUTE,
        recovery: UpOptions {
            wait_device: Duration::ZERO,
            replug_timeout: Duration::from_secs(30),
            attach: attach_options("", false, None),
            dry_run: false,
        },
    }
}

/// Wake-ups until `end` on the virtual clock, then a stop.
struct Until<'a> {
    clock: &'a dyn Clock,
    end: Duration,
}

impl Wakeups for Until<'_> {
    fn wait(&self, timeout: Duration) -> Wake {
        let now = self.clock.now();
        if now + timeout >= self.end {
            self.clock.sleep(self.end.saturating_sub(now));
            return Wake::Stop;
        }
        self.clock.sleep(timeout);
        Wake::Timeout
    }
}

/// Run a watcher over `runner` for `minutes` of virtual time.
fn run_watch(s: &Scenario, runner: &dyn XeRunner, opts: &WatchOptions, minutes: u32) {
    let xe = XeClient::new(runner, s.host.host_uuid().to_string(), false);
    let mut load = || Ok(stand_in_single_ep_image());
    let state = s.store();
    let lock = || Ok(LockAttempt::Held(None));
    let clock = s.host.clock();
    let mut env = WatchEnv {
        usb: s.host.bus(),
        xe: &xe,
        clock,
        load_firmware: &mut load,
        lock: &lock,
        state: &state,
    };
    let until = Until {
        clock,
        end: clock.now() + MINUTE * minutes,
    };
    watch(&mut env, &until, opts);
}

/// A watcher allowed to restart the VM runs, and is killed right after
/// the clean shutdown it began.
fn watcher_killed_mid_restart(s: &Scenario) {
    let killed = KilledAtStart { inner: s.host.xe() };
    let died = catch_unwind(AssertUnwindSafe(|| {
        run_watch(s, &killed, &watch_options(&s.vm, true), 5)
    }));
    assert!(died.is_err(), "the watcher was killed mid-restart");
    assert_eq!(s.power(&s.vm), PowerState::Halted, "left halted");
    assert_eq!(s.vusbs(), vec![(true, false)], "with its new VUSB");
    assert_eq!(
        s.intents(),
        vec![s.vm.clone()],
        "the intent was written first"
    );
}

#[test]
fn a_watcher_killed_mid_restart_is_finished_by_the_next_watcher() {
    let s = scenario(PowerState::Running);
    watcher_killed_mid_restart(&s);

    // The service comes back (systemd restarts it): the VM runs again.
    run_watch(&s, s.host.xe(), &watch_options(&s.vm, true), 3);
    assert_eq!(s.power(&s.vm), PowerState::Running);
    assert_eq!(s.transitions(&s.vm), ONE_RESTART.to_vec());
    assert_eq!(s.vusbs(), vec![(true, true)], "it has the Coral");
    assert!(s.intents().is_empty(), "the intent is cleared");
}

#[test]
fn an_attach_restart_killed_midway_is_finished_by_the_next_up() {
    let s = scenario(PowerState::Running);
    let killed = KilledAtStart { inner: s.host.xe() };
    let died = catch_unwind(AssertUnwindSafe(|| {
        let xe = XeClient::new(&killed, s.host.host_uuid().to_string(), false);
        attach(
            s.host.bus(),
            &xe,
            s.host.clock(),
            &attach_options(&s.vm, true, Some(s.store())),
        )
    }));
    assert!(died.is_err(), "`coral attach --restart` was killed midway");
    assert_eq!(s.power(&s.vm), PowerState::Halted);
    assert_eq!(s.intents(), vec![s.vm.clone()]);

    // `coral up --vm cam` (no --start, no --restart), as the app runs it:
    // the procedure, then the unfinished restarts, under its lock.
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    let opts = UpOptions {
        wait_device: Duration::ZERO,
        replug_timeout: Duration::from_secs(30),
        attach: attach_options(&s.vm, false, Some(s.store())),
        dry_run: false,
    };
    let mut load = || Ok(stand_in_single_ep_image());
    up(s.host.bus(), &xe, s.host.clock(), &mut load, &opts).expect("up");
    let finished = finish_unfinished(&xe, s.host.clock(), &s.store());
    assert_eq!(finished, vec![(s.vm.clone(), Finished::Started)]);
    assert_eq!(s.transitions(&s.vm), ONE_RESTART.to_vec());
    assert_eq!(s.vusbs(), vec![(true, true)]);
    assert!(s.intents().is_empty());
}

#[test]
fn a_vm_the_user_halted_stays_halted_and_stale_intents_are_forgotten() {
    let s = scenario(PowerState::Halted);
    let (web, gone) = {
        let world = s.host.world();
        let mut world = world.borrow_mut();
        let host = s.host.host_uuid().to_string();
        let web = world.add_vm("web", PowerState::Running, Some(&host));
        (web, world.new_uuid())
    };
    // Intents for a VM that runs and for one XAPI no longer has.
    s.store().record_intent(&web, "test").unwrap();
    s.store().record_intent(&gone, "test").unwrap();

    run_watch(&s, s.host.xe(), &watch_options(&s.vm, true), 3);
    let xe = XeClient::new(s.host.xe(), s.host.host_uuid().to_string(), false);
    assert!(finish_unfinished(&xe, s.host.clock(), &s.store()).is_empty());

    assert_eq!(s.power(&s.vm), PowerState::Halted, "the user's halt stands");
    assert!(s.transitions(&s.vm).is_empty());
    assert!(s.transitions(&web).is_empty(), "a running VM is left alone");
    assert!(s.intents().is_empty(), "both stale intents are forgotten");
}

#[test]
fn a_truncated_state_file_loses_its_intent_and_is_kept_aside() {
    let s = scenario(PowerState::Running);
    watcher_killed_mid_restart(&s);
    let path = s.store().path().to_path_buf();
    let whole = std::fs::read(&path).unwrap();
    std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();

    run_watch(&s, s.host.xe(), &watch_options(&s.vm, true), 3);
    // The durable-state rules: kept aside, nothing known; the VM cannot be
    // told from one the user halted, so it stays halted (README).
    assert_eq!(s.store().kept_aside().len(), 1);
    assert_eq!(
        std::fs::read(&s.store().kept_aside()[0]).unwrap(),
        &whole[..whole.len() / 2]
    );
    assert!(s.intents().is_empty());
    assert_eq!(s.power(&s.vm), PowerState::Halted);
    assert_eq!(s.store().problems().len(), 1);
}

//! A soak test of the watcher's promises: a property test (`proptest`)
//! drives the in-process watcher and simulated host (tests/testkit) through
//! simulated weeks of random events, on virtual time, and checks the
//! invariants after every step of the watcher.
//!
//! Events: Corals dropping to their boot loader, silent same-identity
//! re-enumerations, Corals gone and back; xapi outages, late scans; slow,
//! never-acknowledged and failed shutdowns, failed starts; SIGTERM (the
//! watcher stops, finishes what it began, and a new one starts) and SIGHUP
//! with config edits at random instants; pauses (`coral detach`).
//!
//! Invariants, checked whenever the watcher waits (between its steps):
//! - a VM that coral halted runs again within one bounded step
//!   ([`HALT_BOUND`]);
//! - shutdowns begun per VM per hour stay within the budget (per watcher
//!   process: its budget is in memory);
//! - no stray VUSB (at most one per VM, only on mapped VMs);
//! - a paused mapping's VM gets no VUSB, shutdown or start from coral;
//! - the state file stays parseable.
//!
//! CI runs a fixed-seed slice (`cargo test --test soak`, well under 2
//! minutes); `scripts/soak.sh` runs longer and prints the virtual days and
//! the faults survived. Knobs: `SOAK_CASES`, `SOAK_DAYS`, `SOAK_SEED`.

use coral::clock::{Clock, VirtualClock};
use coral::mapping_state::StateStore;
use coral::ops::attach::AttachOptions;
use coral::ops::up::UpOptions;
use coral::ops::watch::{
    watch, LockAttempt, Mapping, Wake, Wakeups, WatchEnv, WatchOptions, STOP_BUDGET,
};
use coral::usb::CoralState;
use coral::xe::client::XeClient;
use coral_testkit::device::{SimBus, SimCoralConfig};
use coral_testkit::host::{stand_in_single_ep_image, SimulatedHost};
use coral_testkit::xapi::{
    Fault, FaultKind, GuestShutdown, OutageKind, PowerState, Vusb, World, WorldConfig,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Restarts allowed per VM per hour in the soak.
const BUDGET: u32 = 2;
/// The longest xapi outage the soak injects.
const MAX_OUTAGE_MINUTES: u64 = 20;
/// "One bounded step": a VM coral halted runs again within this (its
/// shutdown, follow-up and start, the longest retry pause, and the longest
/// xapi outage, during which nothing can start it).
const HALT_BOUND: Duration =
    Duration::from_secs(STOP_BUDGET.as_secs() + 300 + MAX_OUTAGE_MINUTES * 60 + 120);
/// Number of Corals (and VMs).
const CORALS: usize = 2;

/// One thing that happens to the host or the watcher.
#[derive(Clone, Debug)]
enum Event {
    /// Coral `i` browns out: back as its boot loader.
    Drop(usize),
    /// Coral `i` re-enumerates with its firmware (same identity, new device number).
    SilentReenumeration(usize),
    /// Coral `i` leaves the bus.
    Gone(usize),
    /// Coral `i` is plugged in again (as a boot loader).
    Back(usize),
    /// xapi does not answer for this many minutes.
    XapiOutage(u64),
    /// XAPI's scans read the bus late (or on time again).
    LateScans(bool),
    /// VM `i`'s guest shuts down like this from now on; `slow_ms` for a cooperating one.
    Guest(usize, GuestShutdown, u64),
    /// Every `vm-start` fails for this many minutes.
    FailedStarts(u64),
    /// SIGTERM: the watcher stops; a new one starts at once.
    Term,
    /// The config is edited (mapping `i` may restart or not), then SIGHUP.
    Hup(usize, bool),
    /// `coral detach` pauses mapping `i` (true) or `coral up` resumes it.
    Pause(usize, bool),
}

fn event() -> impl Strategy<Value = Event> {
    let coral = 0..CORALS;
    prop_oneof![
        4 => coral.clone().prop_map(Event::Drop),
        2 => coral.clone().prop_map(Event::SilentReenumeration),
        1 => coral.clone().prop_map(Event::Gone),
        2 => coral.clone().prop_map(Event::Back),
        2 => (1..=MAX_OUTAGE_MINUTES).prop_map(Event::XapiOutage),
        1 => any::<bool>().prop_map(Event::LateScans),
        2 => (
            coral.clone(),
            prop_oneof![
                Just(GuestShutdown::Cooperates),
                Just(GuestShutdown::NeverAcknowledges),
                Just(GuestShutdown::NeverHalts)
            ],
            prop_oneof![Just(5_000u64), Just(200_000), Just(400_000)]
        )
            .prop_map(|(i, g, ms)| Event::Guest(i, g, ms)),
        2 => (1u64..=10).prop_map(Event::FailedStarts),
        2 => Just(Event::Term),
        2 => (coral.clone(), any::<bool>()).prop_map(|(i, r)| Event::Hup(i, r)),
        1 => (coral, any::<bool>()).prop_map(|(i, p)| Event::Pause(i, p)),
    ]
}

/// A story: up to `events` events at increasing times (minutes after the
/// previous one); a failing story shrinks to its fewest events.
fn story(events: usize) -> impl Strategy<Value = Vec<(u64, Event)>> {
    proptest::collection::vec((1u64..=720, event()), 1..=events)
}

/// The host: two Corals, ready and passed through to two running VMs.
struct Rig {
    host: SimulatedHost,
    vms: Vec<String>,
    state_dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let clock = Rc::new(VirtualClock::new());
    let bus = Rc::new(SimBus::new(clock.clone()));
    for port in 0..CORALS {
        bus.add_coral(SimCoralConfig::xhci(4 + port as u8), CoralState::Ready);
    }
    let mut world = World::new(WorldConfig::default());
    let host_uuid = world.add_host("xcp-1");
    let vms: Vec<String> = (0..CORALS)
        .map(|i| world.add_vm(&format!("cam-{i}"), PowerState::Running, Some(&host_uuid)))
        .collect();
    let host = SimulatedHost::from_parts(clock, bus, world, host_uuid);
    {
        let world = host.world();
        let mut world = world.borrow_mut();
        for (i, vm) in vms.iter().enumerate() {
            let path = format!("2-{}", 4 + i);
            let pusb = world
                .pusbs
                .iter_mut()
                .find(|p| p.device.path == path)
                .expect("the ready Coral is listed");
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
        }
    }
    Rig {
        host,
        vms,
        state_dir: tempfile::tempdir().expect("a temp dir"),
    }
}

fn mappings(vms: &[String], restart: &[bool]) -> Vec<Mapping> {
    vms.iter()
        .enumerate()
        .map(|(i, vm)| Mapping {
            vm: vm.clone(),
            name: None,
            device: Some(format!("1-{}", 4 + i)),
            start: true,
            restart: restart[i],
            deadlines: Default::default(),
        })
        .collect()
}

fn options(mappings: Vec<Mapping>) -> WatchOptions {
    WatchOptions {
        mappings,
        max_restarts_per_hour: BUDGET,
        // Hotplug events wake the watcher; the backup listing and the XAPI
        // check are slower than the defaults to keep months of virtual time fast.
        usb_poll: MINUTE,
        xapi_check: 10 * MINUTE,
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

/// What the soak counts.
#[derive(Default, Debug)]
struct Tally {
    events: BTreeMap<&'static str, u64>,
    lifetimes: u64,
    restarts: u64,
}

/// The story as the watcher lives it, and the invariants checked at each wait.
struct Story<'a> {
    rig: &'a Rig,
    events: RefCell<VecDeque<(Duration, Event)>>,
    end: Duration,
    /// This lifetime's SIGTERM.
    stop_at: Duration,
    restart: RefCell<Vec<bool>>,
    reload: RefCell<Option<Vec<Mapping>>>,
    violation: RefCell<Option<String>>,
    /// Pause intervals per VM: (from, until).
    paused: RefCell<Vec<Vec<(Duration, Duration)>>>,
    tally: RefCell<Tally>,
    /// Injected `xe` faults end then.
    faults_until: Cell<Duration>,
    checked_calls: Cell<usize>,
    /// Shutdowns begun per VM (virtual times), for the budget.
    shutdowns: RefCell<Vec<Vec<Duration>>>,
}

/// The simulated world keeps every call; the soak forgets the old ones
/// (after checking them) so that a long story stays fast.
const KEEP_CALLS: usize = 2_000;

impl Story<'_> {
    fn now(&self) -> Duration {
        self.rig.host.clock().now()
    }

    fn apply(&self, event: &Event) -> Wake {
        let host = &self.rig.host;
        let now = self.now();
        let name = match event {
            Event::Drop(_) => "drops to the boot loader",
            Event::SilentReenumeration(_) => "silent re-enumerations",
            Event::Gone(_) => "Corals gone",
            Event::Back(_) => "Corals back",
            Event::XapiOutage(_) => "xapi outages",
            Event::LateScans(_) => "late-scan periods",
            Event::Guest(..) => "guest shutdown changes",
            Event::FailedStarts(_) => "failed-start periods",
            Event::Term => "SIGTERMs",
            Event::Hup(..) => "SIGHUPs with config edits",
            Event::Pause(..) => "pauses and resumes",
        };
        *self.tally.borrow_mut().events.entry(name).or_default() += 1;
        match event {
            Event::Drop(i) | Event::Back(i) => {
                host.sim_bus().replug(*i);
                host.udev_event();
                Wake::UsbChanged
            }
            Event::SilentReenumeration(i) => {
                host.sim_bus().link_drop(*i, Duration::from_millis(50));
                host.udev_event();
                Wake::UsbChanged
            }
            Event::Gone(i) => {
                host.sim_bus().unplug(*i);
                host.udev_event();
                Wake::UsbChanged
            }
            Event::XapiOutage(minutes) => {
                let from = now.as_millis() as u64;
                host.world().borrow_mut().add_outage(
                    from,
                    from + minutes * 60_000,
                    OutageKind::Refused,
                );
                Wake::Timeout
            }
            Event::LateScans(late) => {
                let world = host.world();
                let mut world = world.borrow_mut();
                world.config.scan_read_ms = if *late { 200 } else { 0 };
                world.config.scan_delay_ms = if *late { 20_000 } else { 500 };
                Wake::Timeout
            }
            Event::Guest(i, guest, ms) => {
                let world = host.world();
                let mut world = world.borrow_mut();
                world.config.shutdown_ms = *ms;
                if let Some(vm) = world.vm_mut(&self.rig.vms[*i]) {
                    vm.guest_shutdown = *guest;
                }
                Wake::Timeout
            }
            Event::FailedStarts(minutes) => {
                let world = host.world();
                let mut world = world.borrow_mut();
                world.faults = vec![Fault::every(
                    "vm-start",
                    FaultKind::fail("INTERNAL_ERROR", &["Forkhelpers.Spawn_internal_error"]),
                )];
                self.faults_until.set(now + MINUTE * (*minutes as u32));
                Wake::Timeout
            }
            Event::Term => Wake::Stop,
            Event::Hup(i, restart) => {
                self.restart.borrow_mut()[*i] = *restart;
                let edited = mappings(&self.rig.vms, &self.restart.borrow());
                *self.reload.borrow_mut() = Some(edited);
                Wake::Reload
            }
            Event::Pause(i, pause) => {
                let vm = &self.rig.vms[*i];
                let store = StateStore::in_dir(self.rig.state_dir.path());
                let was = store.is_paused(vm);
                if was != *pause {
                    store
                        .set_paused(vm, &format!("cam-{i}"), *pause)
                        .expect("the state file is written");
                    let mut paused = self.paused.borrow_mut();
                    if *pause {
                        paused[*i].push((now, Duration::MAX));
                    } else if let Some(last) = paused[*i].last_mut() {
                        last.1 = now;
                    }
                }
                Wake::Timeout
            }
        }
    }

    /// Every invariant, as of now; the first broken one is kept.
    fn check(&self, lifetime_start: Duration) {
        if self.violation.borrow().is_some() {
            return;
        }
        if let Err(what) = self.invariants(lifetime_start) {
            *self.violation.borrow_mut() = Some(format!("at {:?}: {what}", self.now()));
        }
    }

    fn invariants(&self, lifetime_start: Duration) -> Result<(), String> {
        let now = self.now();
        let world = self.rig.host.world();
        let mut world = world.borrow_mut();
        if !world.faults.is_empty() && now >= self.faults_until.get() {
            world.faults.clear();
        }
        for (i, vm) in self.rig.vms.iter().enumerate() {
            // A VM coral halted runs again within one bounded step.
            let last = world.power_history.iter().rev().find(|e| &e.vm_uuid == vm);
            if let Some(e) = last {
                let at = Duration::from_millis(e.at_ms);
                if e.to == PowerState::Halted && now.saturating_sub(at) > HALT_BOUND {
                    return Err(format!(
                        "VM cam-{i} halted at {at:?} and still halted ({:?} later)",
                        now - at
                    ));
                }
            }
            // No stray VUSB: at most one per VM.
            let vusbs = world.vusbs.iter().filter(|v| &v.vm_uuid == vm).count();
            if vusbs > 1 {
                return Err(format!("VM cam-{i} has {vusbs} VUSBs"));
            }
        }
        if let Some(v) = world
            .vusbs
            .iter()
            .find(|v| !self.rig.vms.contains(&v.vm_uuid))
        {
            return Err(format!("a VUSB of an unmapped VM: {v:?}"));
        }
        // The calls since the last check: shutdowns begun per VM per hour,
        // within this watcher's life; and pauses honoured: nothing new for
        // a paused VM (a VM coral halted before the pause may be started).
        let paused = self.paused.borrow();
        let mut shutdowns = self.shutdowns.borrow_mut();
        for call in &world.calls[self.checked_calls.get().min(world.calls.len())..] {
            let at = Duration::from_millis(call.at_ms);
            if call.args[0] == "vm-shutdown" {
                for (i, vm) in self.rig.vms.iter().enumerate() {
                    if call.args[1] != format!("uuid={vm}") {
                        continue;
                    }
                    shutdowns[i].push(at);
                    let in_hour = shutdowns[i]
                        .iter()
                        .filter(|t| **t >= lifetime_start && at - **t < HOUR)
                        .count();
                    if in_hour as u32 > BUDGET {
                        return Err(format!(
                            "VM cam-{i}: {in_hour} shutdowns within an hour (budget {BUDGET}) at {at:?}"
                        ));
                    }
                }
            }
            let write = matches!(call.args[0].as_str(), "vusb-create" | "vm-shutdown");
            if !write {
                continue;
            }
            for (i, vm) in self.rig.vms.iter().enumerate() {
                let about = call.args.iter().any(|a| a.ends_with(vm.as_str()));
                let during = paused[i]
                    .iter()
                    .any(|(from, until)| at > *from && at < *until);
                if about && during {
                    return Err(format!("{} for paused VM cam-{i} at {at:?}", call.args[0]));
                }
            }
        }
        if world.calls.len() > KEEP_CALLS {
            world.calls.clear();
        }
        self.checked_calls.set(world.calls.len());
        StateStore::in_dir(self.rig.state_dir.path())
            .load()
            .map_err(|e| format!("the state file does not parse: {e}"))?;
        Ok(())
    }
}

/// The wake-ups of one watcher lifetime.
struct Lifetime<'a, 'b> {
    story: &'b Story<'a>,
    started: Duration,
}

impl Wakeups for Lifetime<'_, '_> {
    fn wait(&self, timeout: Duration) -> Wake {
        let story = self.story;
        story.check(self.started);
        if story.violation.borrow().is_some() {
            return Wake::Stop;
        }
        let clock = story.rig.host.clock();
        let now = clock.now();
        if now >= story.stop_at {
            return Wake::Stop;
        }
        let next = story.events.borrow().front().map(|(at, _)| *at);
        match next {
            Some(at) if at <= now + timeout => {
                let (at, event) = story.events.borrow_mut().pop_front().expect("an event");
                clock.sleep(at.saturating_sub(now));
                if std::env::var_os("SOAK_TRACE").is_some() {
                    eprintln!("soak: {at:?} {event:?}");
                }
                let wake = story.apply(&event);
                story.check(self.started);
                wake
            }
            _ if now + timeout >= story.end => {
                clock.sleep(story.end.saturating_sub(now));
                Wake::Stop
            }
            _ => {
                clock.sleep(timeout);
                Wake::Timeout
            }
        }
    }

    fn reload(&self) -> anyhow::Result<Vec<Mapping>> {
        self.story
            .reload
            .borrow_mut()
            .take()
            .ok_or_else(|| anyhow::anyhow!("no config edit"))
    }
}

/// The watcher's clock in a lifetime: the host's, stopped at its SIGTERM.
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

/// Live the story: watcher lifetimes one after the other, each ended by a
/// SIGTERM (or the story's end). Returns the tally, or the broken invariant.
fn live(events: &[(u64, Event)]) -> Result<(Duration, Tally), String> {
    let rig = rig();
    let mut at = Duration::ZERO;
    let timed: VecDeque<(Duration, Event)> = events
        .iter()
        .map(|(gap, e)| {
            at += MINUTE * (*gap as u32);
            (at, e.clone())
        })
        .collect();
    let end = at + 2 * HOUR;
    let story = Story {
        rig: &rig,
        events: RefCell::new(timed),
        end,
        stop_at: Duration::MAX,
        restart: RefCell::new(vec![true, false]),
        reload: RefCell::new(None),
        violation: RefCell::new(None),
        paused: RefCell::new(vec![Vec::new(); CORALS]),
        tally: RefCell::new(Tally::default()),
        faults_until: Cell::new(Duration::ZERO),
        checked_calls: Cell::new(0),
        shutdowns: RefCell::new(vec![Vec::new(); CORALS]),
    };
    let mut story = story;
    loop {
        let started = rig.host.clock().now();
        // This lifetime ends at the next SIGTERM.
        story.stop_at = story
            .events
            .borrow()
            .iter()
            .find(|(_, e)| matches!(e, Event::Term))
            .map(|(at, _)| *at)
            .unwrap_or(Duration::MAX);
        let opts = options(mappings(&rig.vms, &story.restart.borrow()));
        let xe = XeClient::new(rig.host.xe(), rig.host.host_uuid().to_string(), false);
        let state = StateStore::in_dir(rig.state_dir.path());
        let clock = StopAt {
            clock: rig.host.clock(),
            stop_at: story.stop_at,
        };
        let lock = || Ok(LockAttempt::Held(None));
        let mut load = || Ok(stand_in_single_ep_image());
        let mut env = WatchEnv {
            usb: rig.host.bus(),
            xe: &xe,
            clock: &clock,
            load_firmware: &mut load,
            lock: &lock,
            state: &state,
        };
        let lifetime = Lifetime {
            story: &story,
            started,
        };
        watch(&mut env, &lifetime, &opts);
        story.tally.borrow_mut().lifetimes += 1;
        // Right after the stop: what coral began has ended with the VM running.
        if story.violation.borrow().is_none() && story.stop_at != Duration::MAX {
            let world = rig.host.world();
            let world = world.borrow();
            for (i, vm) in rig.vms.iter().enumerate() {
                let last = world.power_history.iter().rev().find(|e| &e.vm_uuid == vm);
                if last.is_some_and(|e| {
                    e.to == PowerState::Halted
                        && Duration::from_millis(e.at_ms) >= started
                        && world.current_operations(vm).is_empty()
                }) {
                    *story.violation.borrow_mut() = Some(format!(
                        "the watcher stopped at {:?} leaving cam-{i} halted",
                        rig.host.clock().now()
                    ));
                }
            }
        }
        if let Some(v) = story.violation.borrow().clone() {
            return Err(v);
        }
        let now = rig.host.clock().now();
        if now >= end || story.events.borrow().is_empty() && story.stop_at == Duration::MAX {
            break;
        }
        // Drop the SIGTERM that ended this lifetime (if it is still queued).
        let mut events = story.events.borrow_mut();
        if let Some(k) = events.iter().position(|(_, e)| matches!(e, Event::Term)) {
            if events[k].0 <= now {
                events.remove(k);
            }
        }
    }
    story.check(Duration::ZERO);
    let restarts = story.shutdowns.borrow().iter().map(Vec::len).sum::<usize>() as u64;
    let mut tally = story.tally.into_inner();
    tally.restarts = restarts;
    Ok((rig.host.clock().now(), tally))
}

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn the_watcher_keeps_its_promises_through_simulated_weeks() {
    let cases = knob("SOAK_CASES", 6) as u32;
    let days = knob("SOAK_DAYS", 14);
    let seed = knob("SOAK_SEED", 17);
    // One event every 6 hours on average: up to 8 a day, 4 on average.
    let events = (days * 8) as usize;
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let total = RefCell::new((Duration::ZERO, Tally::default()));
    let result = runner.run(&story(events), |events| {
        let (lived, tally) = live(&events).map_err(TestCaseError::fail)?;
        let mut total = total.borrow_mut();
        total.0 += lived;
        for (k, v) in tally.events {
            *total.1.events.entry(k).or_default() += v;
        }
        total.1.lifetimes += tally.lifetimes;
        total.1.restarts += tally.restarts;
        Ok(())
    });
    let (lived, tally) = total.into_inner();
    let faults: u64 = tally.events.values().sum();
    println!(
        "soak: {cases} stories, {:.1} virtual days, {faults} events survived, {} watcher lifetimes, {} shutdowns begun (seed {seed})",
        lived.as_secs_f64() / DAY.as_secs_f64(),
        tally.lifetimes,
        tally.restarts,
    );
    for (name, count) in &tally.events {
        println!("soak:   {count:>6} {name}");
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}

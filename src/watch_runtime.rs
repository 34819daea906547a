//! The one owner of the process's lifetime (style anchors, "Long-running
//! code"): SIGTERM and SIGINT become a stop request that procedures ask
//! about through their clock ("may I begin a step that changes a VM?"),
//! SIGHUP becomes a reload; libusb hotplug events wake the watcher. Under
//! `--simulate`, a short scripted story instead.
//!
//! A stop never jumps the clock: deadlines keep their meaning, so a clean
//! shutdown in flight is still followed to its end and the VM started again.

use coral::clock::{Clock, SystemClock};
use coral::ops::watch::{Mapping, Wake, Wakeups, STOP_BUDGET};
use coral::simulate::SimulatedHost;
use coral::usb::rusb_backend::spawn_hotplug_listener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A stop request: set once, with when it came.
#[derive(Default)]
pub struct StopRequest {
    flag: AtomicBool,
    at: OnceLock<Instant>,
}

impl StopRequest {
    fn set(&self) {
        let _ = self.at.set(Instant::now());
        self.flag.store(true, Ordering::SeqCst);
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// How finely a cancellable sleep checks for a stop request.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// Re-reads the mappings on SIGHUP.
pub type Reload = Box<dyn Fn() -> anyhow::Result<Vec<Mapping>>>;

/// Turn SIGTERM and SIGINT into a stop flag (and, when `sender` is given,
/// SIGHUP into a reload and every signal into a wake-up). No work happens in
/// the handler: the flag and the messages are read between steps.
fn listen_for_signals(
    stop: Arc<StopRequest>,
    sender: Option<std::sync::mpsc::Sender<Wake>>,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let wanted: &[i32] = if sender.is_some() {
        &[SIGTERM, SIGINT, SIGHUP]
    } else {
        &[SIGTERM, SIGINT]
    };
    let mut signals = signal_hook::iterator::Signals::new(wanted)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let wake = if signal == SIGHUP {
                    Wake::Reload
                } else {
                    stop.set();
                    Wake::Stop
                };
                if let Some(sender) = &sender {
                    let _ = sender.send(wake);
                }
            }
        })?;
    Ok(())
}

/// `coral up` (the boot unit, or a run by hand): SIGTERM and SIGINT stop it
/// between steps, through the clock this returns.
pub fn stoppable_clock() -> anyhow::Result<CancellableClock> {
    let stop = Arc::new(StopRequest::default());
    listen_for_signals(stop.clone(), None)?;
    Ok(CancellableClock::new(stop))
}

/// Signals and hotplug events, through one channel.
pub struct HostWakeups {
    events: Receiver<Wake>,
    stop: Arc<StopRequest>,
    reload: Reload,
}

impl HostWakeups {
    /// Listen for SIGTERM, SIGINT, SIGHUP (`reload` re-reads the mappings)
    /// and USB hotplug events.
    pub fn start(reload: Reload) -> anyhow::Result<Self> {
        let (sender, events) = channel();
        let stop = Arc::new(StopRequest::default());
        listen_for_signals(stop.clone(), Some(sender.clone()))?;
        let hotplug = spawn_hotplug_listener(Arc::new(move || {
            let _ = sender.send(Wake::UsbChanged);
        }))
        .map_err(|e| coral::error::fail(coral::error::FailureKind::Usb, format!("watch: {e}")))?;
        if hotplug {
            log::info!("watch: listening for USB hotplug events");
        } else {
            log::info!("watch: this libusb has no hotplug events; listing USB devices instead");
        }
        Ok(HostWakeups {
            events,
            stop,
            reload,
        })
    }

    /// Set once a stop was requested.
    pub fn stop_flag(&self) -> Arc<StopRequest> {
        self.stop.clone()
    }
}

impl Wakeups for HostWakeups {
    fn wait(&self, timeout: Duration) -> Wake {
        match self.events.recv_timeout(timeout) {
            Ok(Wake::UsbChanged) => {
                // One check covers a burst of events (a re-enumeration is
                // two); a signal in the burst is not lost.
                let mut wake = Wake::UsbChanged;
                while let Ok(next) = self.events.try_recv() {
                    match next {
                        Wake::Stop => return Wake::Stop,
                        Wake::Reload => wake = Wake::Reload,
                        _ => {}
                    }
                }
                wake
            }
            Ok(wake) => wake,
            Err(RecvTimeoutError::Timeout) => Wake::Timeout,
            Err(RecvTimeoutError::Disconnected) => Wake::Stop,
        }
    }

    fn reload(&self) -> anyhow::Result<Vec<Mapping>> {
        (self.reload)()
    }
}

/// The real clock, which knows whether a stop was requested. A sleep under
/// way when the stop arrives ends at once (so a wait before a step notices
/// within [`SLEEP_SLICE`]); later sleeps are whole, so a follow-up of an
/// operation in flight polls at its usual pace. Time never jumps.
pub struct CancellableClock {
    inner: SystemClock,
    origin: Instant,
    stop: Arc<StopRequest>,
}

impl CancellableClock {
    /// A clock that `stop` cancels.
    pub fn new(stop: Arc<StopRequest>) -> Self {
        CancellableClock {
            inner: SystemClock::new(),
            origin: Instant::now(),
            stop,
        }
    }

    fn cancelled(&self) -> bool {
        self.stop.is_set()
    }
}

impl Clock for CancellableClock {
    fn now(&self) -> Duration {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) {
        let already_stopped = self.cancelled();
        let until = self.inner.now().saturating_add(duration);
        loop {
            if !already_stopped && self.cancelled() {
                return;
            }
            let now = self.inner.now();
            if now >= until {
                return;
            }
            std::thread::sleep(SLEEP_SLICE.min(until - now));
        }
    }

    fn stop_requested(&self) -> bool {
        self.cancelled()
    }

    /// After a stop, what has begun must end within [`STOP_BUDGET`] of it
    /// (the units' `TimeoutStopSec` covers it).
    fn deadline(&self) -> Option<Duration> {
        let at = *self.stop.at.get()?;
        let since_origin = at.saturating_duration_since(self.origin);
        Some(since_origin.saturating_add(STOP_BUDGET))
    }
}

/// `--simulate`: on virtual time, the Coral falls back to its boot loader
/// 30 s in (a brownout), and the watch ends at 2 minutes.
pub struct SimulatedWakeups<'a> {
    host: &'a SimulatedHost,
    dropped: std::cell::Cell<bool>,
}

/// When the simulated Coral drops.
const SIMULATED_DROP_AT: Duration = Duration::from_secs(30);
/// When the simulated watch ends.
const SIMULATED_END_AT: Duration = Duration::from_secs(120);

impl<'a> SimulatedWakeups<'a> {
    /// The story on `host`.
    pub fn new(host: &'a SimulatedHost) -> Self {
        SimulatedWakeups {
            host,
            dropped: std::cell::Cell::new(false),
        }
    }
}

impl Wakeups for SimulatedWakeups<'_> {
    fn wait(&self, timeout: Duration) -> Wake {
        let clock = self.host.clock();
        if !self.dropped.get() && clock.now() + timeout >= SIMULATED_DROP_AT {
            clock.sleep(SIMULATED_DROP_AT.saturating_sub(clock.now()));
            self.dropped.set(true);
            log::warn!(
                "simulation, at {:.1} s of virtual time: the Coral browns out and comes back as its boot loader",
                clock.now().as_secs_f64()
            );
            self.host.brownout(0);
            return Wake::UsbChanged;
        }
        if clock.now() + timeout >= SIMULATED_END_AT {
            clock.sleep(SIMULATED_END_AT.saturating_sub(clock.now()));
            log::info!(
                "simulation, at {:.1} s of virtual time: ending the watch",
                clock.now().as_secs_f64()
            );
            return Wake::Stop;
        }
        clock.sleep(timeout);
        Wake::Timeout
    }
}

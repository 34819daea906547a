//! What `coral watch` waits on: SIGTERM/SIGINT and libusb hotplug events on
//! the real host, or a short scripted story under `--simulate`.

use coral::clock::{Clock, SystemClock};
use coral::ops::watch::{Wake, Wakeups};
use coral::simulate::SimulatedHost;
use coral::usb::rusb_backend::spawn_hotplug_listener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// How finely a cancellable sleep checks for a stop request.
const SLEEP_SLICE: Duration = Duration::from_millis(50);
/// How far a cancelled clock jumps, so that every pending deadline has passed.
const CANCELLED_JUMP: Duration = Duration::from_secs(24 * 3600);

/// Signals and hotplug events, through one channel.
pub struct HostWakeups {
    events: Receiver<Wake>,
    stop: Arc<AtomicBool>,
}

impl HostWakeups {
    /// Listen for SIGTERM, SIGINT and USB hotplug events.
    pub fn start() -> anyhow::Result<Self> {
        let (sender, events) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        let stop_sender = sender.clone();
        let stop_flag = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    stop_flag.store(true, Ordering::SeqCst);
                    let _ = stop_sender.send(Wake::Stop);
                }
            })?;
        let hotplug = spawn_hotplug_listener(Arc::new(move || {
            let _ = sender.send(Wake::UsbChanged);
        }))
        .map_err(|e| coral::error::fail(coral::error::FailureKind::Usb, format!("watch: {e}")))?;
        if hotplug {
            log::info!("watch: listening for USB hotplug events");
        } else {
            log::info!("watch: this libusb has no hotplug events; listing USB devices instead");
        }
        Ok(HostWakeups { events, stop })
    }

    /// Set once a stop was requested.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

impl Wakeups for HostWakeups {
    fn wait(&self, timeout: Duration) -> Wake {
        match self.events.recv_timeout(timeout) {
            Ok(Wake::UsbChanged) => {
                // One check covers a burst of events (a re-enumeration is two).
                while let Ok(next) = self.events.try_recv() {
                    if next == Wake::Stop {
                        return Wake::Stop;
                    }
                }
                Wake::UsbChanged
            }
            Ok(wake) => wake,
            Err(RecvTimeoutError::Timeout) => Wake::Timeout,
            Err(RecvTimeoutError::Disconnected) => Wake::Stop,
        }
    }
}

/// The real clock, until a stop is requested: then every sleep ends at
/// once and every deadline has passed, so a recovery in progress winds down
/// through its own rollback instead of waiting out its deadlines.
pub struct CancellableClock {
    inner: SystemClock,
    stop: Arc<AtomicBool>,
}

impl CancellableClock {
    /// A clock that `stop` cancels.
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        CancellableClock {
            inner: SystemClock::new(),
            stop,
        }
    }

    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

impl Clock for CancellableClock {
    fn now(&self) -> Duration {
        if self.cancelled() {
            self.inner.now() + CANCELLED_JUMP
        } else {
            self.inner.now()
        }
    }

    fn sleep(&self, duration: Duration) {
        let until = self.inner.now() + duration;
        while !self.cancelled() {
            let now = self.inner.now();
            if now >= until {
                return;
            }
            std::thread::sleep(SLEEP_SLICE.min(until - now));
        }
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

//! Time, behind a trait, so that every wait is a poll with a deadline and the
//! simulators can run on virtual time (no real sleeping in unit tests).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// A source of "now" and a way to wait.
pub trait Clock {
    /// Time elapsed since this clock's origin.
    fn now(&self) -> Duration;
    /// Wait for `duration` (a virtual clock just advances).
    fn sleep(&self, duration: Duration);
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration)
    }
}

/// A virtual clock for tests: `sleep` advances time instantly.
#[derive(Debug, Default)]
pub struct VirtualClock {
    now: Cell<Duration>,
}

impl VirtualClock {
    /// A virtual clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }
    /// Move time forward without anyone sleeping.
    pub fn advance(&self, by: Duration) {
        self.now.set(self.now.get() + by);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        self.now.get()
    }
    fn sleep(&self, duration: Duration) {
        self.advance(duration)
    }
}

/// Poll `probe` every `interval` until it yields `Some`, or `timeout` passes.
///
/// Probes once immediately, so an already-true condition costs no waiting.
/// Returns `Ok(None)` on timeout; errors from the probe end the wait.
pub fn poll_until<T, E>(
    clock: &dyn Clock,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let deadline = clock.now() + timeout;
    loop {
        if let Some(found) = probe()? {
            return Ok(Some(found));
        }
        let now = clock.now();
        if now >= deadline {
            return Ok(None);
        }
        clock.sleep(interval.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_returns_at_once_when_already_true() {
        let clock = VirtualClock::new();
        let got: Result<Option<u8>, ()> = poll_until(
            &clock,
            Duration::from_secs(1),
            Duration::from_millis(10),
            || Ok(Some(7)),
        );
        assert_eq!(got, Ok(Some(7)));
        assert_eq!(clock.now(), Duration::ZERO);
    }

    #[test]
    fn poll_gives_up_at_the_deadline() {
        let clock = VirtualClock::new();
        let mut probes = 0;
        let got: Result<Option<u8>, ()> = poll_until(
            &clock,
            Duration::from_millis(100),
            Duration::from_millis(30),
            || {
                probes += 1;
                Ok(None)
            },
        );
        assert_eq!(got, Ok(None));
        assert_eq!(clock.now(), Duration::from_millis(100));
        assert_eq!(probes, 5); // 0, 30, 60, 90, 100
    }
}

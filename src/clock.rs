//! Time, behind a trait, so that every wait is a poll with a deadline and the
//! simulators can run on virtual time (no real sleeping in unit tests).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The longest wait coral accepts anywhere: every duration flag and config
/// value is checked against it ([`checked_seconds`]), and every deadline is
/// capped by it ([`deadline_after`]), so no deadline arithmetic can overflow.
pub const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A number of seconds as a duration, range-checked: finite, not negative,
/// at most [`MAX_WAIT`], and above 0 unless `zero_ok`. The one parser of
/// every duration flag (exit 2) and config value (a line-numbered error).
pub fn checked_seconds(value: f64, zero_ok: bool) -> Result<Duration, String> {
    let max = MAX_WAIT.as_secs();
    let least = if zero_ok { "0 or more" } else { "above 0" };
    let fits = value.is_finite() && value >= 0.0 && value <= MAX_WAIT.as_secs_f64();
    match Duration::try_from_secs_f64(value) {
        Ok(duration) if fits && (zero_ok || !duration.is_zero()) => Ok(duration),
        _ => Err(format!(
            "give a number of seconds, {least} and at most {max} (a week)"
        )),
    }
}

/// The deadline `timeout` from now on `clock`; a timeout beyond
/// [`MAX_WAIT`] is capped there, and the sum saturates instead of overflowing.
pub fn deadline_after(clock: &dyn Clock, timeout: Duration) -> Duration {
    clock.now().saturating_add(timeout.min(MAX_WAIT))
}

/// What is left until `deadline` now: zero once it has passed (time may
/// pass between a check and the sleep that follows it).
pub fn time_left(clock: &dyn Clock, deadline: Duration) -> Duration {
    deadline.saturating_sub(clock.now())
}

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
        self.now.set(self.now.get().saturating_add(by));
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
    let deadline = deadline_after(clock, timeout);
    loop {
        if let Some(found) = probe()? {
            return Ok(Some(found));
        }
        let now = clock.now();
        if now >= deadline {
            return Ok(None);
        }
        clock.sleep(interval.min(deadline.saturating_sub(now)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_range_checked_and_deadlines_never_overflow() {
        for bad in [
            f64::NAN,
            f64::INFINITY,
            -1.0,
            18446744073709549568.0,
            604800.5,
        ] {
            assert!(checked_seconds(bad, true).is_err(), "{bad}");
        }
        assert!(checked_seconds(0.0, false).is_err());
        assert_eq!(checked_seconds(0.0, true), Ok(Duration::ZERO));
        assert_eq!(checked_seconds(2.5, false), Ok(Duration::from_millis(2500)));
        assert_eq!(checked_seconds(604800.0, false), Ok(MAX_WAIT));
        let clock = VirtualClock::new();
        clock.advance(Duration::MAX);
        assert_eq!(deadline_after(&clock, Duration::MAX), Duration::MAX);
        assert_eq!(time_left(&clock, Duration::from_secs(1)), Duration::ZERO);
        let clock = VirtualClock::new();
        assert_eq!(deadline_after(&clock, Duration::MAX), MAX_WAIT);
    }

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

//! [`InProcessXe`]: an [`XeRunner`] backed by an in-memory [`World`] on a
//! (usually virtual) clock, for fast unit and fault tests.

use super::World;
use coral::clock::Clock;
use coral::xe::{ArrivesLater, StartedCall, XeError, XeRunner};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// Runs `xe` command lines against a shared in-memory world.
pub struct InProcessXe {
    /// The world; tests keep a clone of the `Rc` to inspect it afterwards.
    pub world: Rc<RefCell<World>>,
    clock: Rc<dyn Clock>,
}

impl InProcessXe {
    /// A runner over `world`, spending time on `clock`.
    pub fn new(world: Rc<RefCell<World>>, clock: Rc<dyn Clock>) -> Self {
        InProcessXe { world, clock }
    }
}

impl InProcessXe {
    /// The time on its clock.
    pub fn clock_now(&self) -> Duration {
        self.clock.now()
    }
}

impl XeRunner for InProcessXe {
    /// Runs at once (its effect, and the state it reads, are those at its
    /// start); its answer arrives after the call's duration on the clock.
    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        let began = self.clock.now();
        let result = self.world.borrow_mut().execute(args, began);
        let output = result.output;
        let answer = if output.status == 0 {
            Ok(output.stdout)
        } else {
            let message = if output.stderr.trim().is_empty() {
                output.stdout
            } else {
                output.stderr
            };
            Err(XeError::from_output(args, output.status, &message))
        };
        Box::new(ArrivesLater {
            clock: self.clock.as_ref(),
            began,
            took: result.duration,
            timeout,
            args: args.to_vec(),
            answer,
        })
    }

    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        let now = self.clock.now();
        let result = self.world.borrow_mut().execute(args, now);
        if result.duration > timeout {
            // A caller with a deadline kills the client; the world's execute
            // applies nothing for calls that never finish (hangs).
            self.clock.sleep(timeout);
            return Err(XeError::TimedOut {
                args: args.to_vec(),
                after: timeout,
            });
        }
        self.clock.sleep(result.duration);
        let output = result.output;
        if output.status == 0 {
            Ok(output.stdout)
        } else {
            let message = if output.stderr.trim().is_empty() {
                output.stdout
            } else {
                output.stderr
            };
            Err(XeError::from_output(args, output.status, &message))
        }
    }
}

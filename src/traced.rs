//! `-vv` under `--simulate`: the simulated USB bus and `xe` traced exactly
//! as the real backends trace themselves (`coral::usb::rusb_backend`,
//! `coral::xe::command`): every USB request and every `xe` call. The DFU
//! requests themselves are traced, by name, where they are sent (`coral::dfu`).

use coral::usb::{CoralDevice, InterfaceInfo, ResetOutcome, UsbBus, UsbError, UsbTransport};
use coral::xe::{display_args, StartedCall, XeError, XeRunner};
use std::time::Duration;

/// A USB bus whose every request is logged at trace level.
pub struct TracedBus<'a>(pub &'a dyn UsbBus);

impl UsbBus for TracedBus<'_> {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        let result = self.0.list_corals();
        match &result {
            Ok(corals) => log::trace!("list Corals: {} found", corals.len()),
            Err(err) => log::trace!("list Corals: {err}"),
        }
        result
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        log::trace!("open {} ({})", device.path, device.state.id());
        let inner = self.0.open(device)?;
        Ok(Box::new(TracedTransport(inner)))
    }

    fn qemu_node(&self, path: &str, domid: u32) -> coral::usb::NodeCheck {
        self.0.qemu_node(path, domid)
    }
}

/// An open device whose every request is logged at trace level.
struct TracedTransport(Box<dyn UsbTransport>);

/// Log a failed request and pass the result on.
fn traced<T>(what: &str, result: Result<T, UsbError>) -> Result<T, UsbError> {
    if let Err(err) = &result {
        log::trace!("{what}: {err}");
    }
    result
}

impl UsbTransport for TracedTransport {
    fn interfaces(&self) -> Result<Vec<InterfaceInfo>, UsbError> {
        let result = traced("configuration descriptor", self.0.interfaces());
        if let Ok(interfaces) = &result {
            log::trace!("configuration descriptor: {} interfaces", interfaces.len());
        }
        result
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        log::trace!("claim interface {number}");
        traced("claim interface", self.0.claim_interface(number))
    }

    // Control transfers are traced by `coral::dfu`, which sends them all and
    // names each as dfu-util's users read it (`DNLOAD block 3: 256 bytes`),
    // under `--simulate` and on real hardware alike.
    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
    ) -> Result<usize, UsbError> {
        self.0.control_in(request_type, request, value, index, buf)
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, UsbError> {
        self.0
            .control_out(request_type, request, value, index, data)
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        let outcome = traced("port reset", self.0.reset())?;
        log::trace!("port reset: {outcome:?}");
        Ok(outcome)
    }
}

/// An `xe` whose every call is logged at trace level.
pub struct TracedXe<'a>(pub &'a dyn XeRunner);

impl XeRunner for TracedXe<'_> {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        log::trace!("xe {}", display_args(args));
        traced_answer(args, self.0.run(args, timeout))
    }

    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        log::trace!("xe {} (started)", display_args(args));
        Box::new(TracedCall {
            args: args.to_vec(),
            call: self.0.start(args, timeout),
        })
    }
}

/// A started call whose failure is traced when it is collected.
struct TracedCall<'r> {
    args: Vec<String>,
    call: Box<dyn StartedCall + 'r>,
}

impl StartedCall for TracedCall<'_> {
    fn wait(self: Box<Self>) -> Result<String, XeError> {
        traced_answer(&self.args, self.call.wait())
    }
}

fn traced_answer(args: &[String], result: Result<String, XeError>) -> Result<String, XeError> {
    if let Err(err) = &result {
        log::trace!(
            "xe {}: {err}",
            args.first().map(String::as_str).unwrap_or("")
        );
    }
    result
}

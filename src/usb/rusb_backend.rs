//! The one file that talks to libusb (through rusb). Every listing and every
//! open starts from a fresh `rusb::Context` (never the global one, which
//! panics when libusb cannot start, and which a statically linked libusb
//! does not keep up to date across a re-enumeration).

use super::{
    CoralDevice, CoralState, InterfaceInfo, PortPath, ResetOutcome, UsbBus, UsbError, UsbId,
    UsbTransport,
};
use rusb::{Context, DeviceHandle, UsbContext};
use std::time::Duration;

/// Deadline of one control transfer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// The host's real USB bus.
#[derive(Debug, Default)]
pub struct RusbBus;

impl RusbBus {
    /// The real bus.
    pub fn new() -> Self {
        RusbBus
    }
}

/// A fresh libusb context; tried twice, as creating one can fail while the
/// bus is changing.
fn context() -> Result<Context, UsbError> {
    Context::new()
        .or_else(|_| Context::new())
        .map_err(|e| match e {
            rusb::Error::Access => UsbError::Access,
            other => UsbError::Other(format!("libusb cannot start: {other}")),
        })
}

fn map_error(error: rusb::Error) -> UsbError {
    match error {
        rusb::Error::NoDevice | rusb::Error::NotFound => UsbError::NoDevice,
        rusb::Error::Pipe => UsbError::Stall,
        rusb::Error::Timeout => UsbError::Timeout,
        rusb::Error::Access => UsbError::Access,
        rusb::Error::Busy => UsbError::Busy,
        other => UsbError::Other(other.to_string()),
    }
}

fn coral_of(device: &rusb::Device<Context>) -> Option<CoralDevice> {
    let descriptor = device.device_descriptor().ok()?;
    let state = CoralState::from_id(UsbId {
        vendor: descriptor.vendor_id(),
        product: descriptor.product_id(),
    })?;
    let ports = device.port_numbers().ok()?;
    if ports.is_empty() {
        return None;
    }
    Some(CoralDevice {
        path: PortPath::new(device.bus_number(), ports),
        address: device.address(),
        state,
    })
}

impl UsbBus for RusbBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        let context = context()?;
        let devices = context.devices().map_err(map_error)?;
        let mut corals: Vec<CoralDevice> = devices.iter().filter_map(|d| coral_of(&d)).collect();
        corals.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(corals)
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        let context = context()?;
        let found = context
            .devices()
            .map_err(map_error)?
            .iter()
            .find(|d| coral_of(d).as_ref() == Some(device))
            .ok_or(UsbError::NoDevice)?;
        let handle = found.open().map_err(map_error)?;
        Ok(Box::new(RusbTransport { handle }))
    }
}

/// An open Coral.
struct RusbTransport {
    handle: DeviceHandle<Context>,
}

impl UsbTransport for RusbTransport {
    fn interfaces(&self) -> Result<Vec<InterfaceInfo>, UsbError> {
        let config = self
            .handle
            .device()
            .active_config_descriptor()
            .or_else(|_| self.handle.device().config_descriptor(0))
            .map_err(map_error)?;
        Ok(config
            .interfaces()
            .flat_map(|interface| interface.descriptors())
            .map(|d| InterfaceInfo {
                number: d.interface_number(),
                alt_setting: d.setting_number(),
                class: d.class_code(),
                subclass: d.sub_class_code(),
                protocol: d.protocol_code(),
                extra: d.extra().to_vec(),
            })
            .collect())
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        if let Ok(true) = self.handle.kernel_driver_active(number) {
            self.handle
                .detach_kernel_driver(number)
                .map_err(map_error)?;
        }
        self.handle.claim_interface(number).map_err(map_error)
    }

    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
    ) -> Result<usize, UsbError> {
        let n = self
            .handle
            .read_control(request_type, request, value, index, buf, CONTROL_TIMEOUT)
            .map_err(map_error)?;
        log::trace!("control in {request_type:#04x}/{request} value {value} -> {n} bytes");
        Ok(n)
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, UsbError> {
        let n = self
            .handle
            .write_control(request_type, request, value, index, data, CONTROL_TIMEOUT)
            .map_err(map_error)?;
        log::trace!("control out {request_type:#04x}/{request} value {value}: {n} bytes");
        Ok(n)
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        match self.handle.reset() {
            Ok(()) => Ok(ResetOutcome::SameDevice),
            // The device left the bus to come back with other descriptors.
            Err(rusb::Error::NotFound | rusb::Error::NoDevice) => Ok(ResetOutcome::Reenumerating),
            Err(other) => Err(map_error(other)),
        }
    }
}

/// Calls `notify` whenever libusb reports a Coral (either identity) arriving
/// or leaving, from a thread of its own. Returns false when this libusb has
/// no hotplug support or cannot start; the caller then relies on listings.
pub fn spawn_hotplug_listener(notify: std::sync::Arc<dyn Fn() + Send + Sync>) -> bool {
    if !rusb::has_hotplug() {
        return false;
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("usb-hotplug".into())
        .spawn(move || {
            let registered = context().ok().and_then(|context| {
                let registrations: Vec<_> = [super::UNINITIALIZED_ID, super::READY_ID]
                    .iter()
                    .filter_map(|id| {
                        rusb::HotplugBuilder::new()
                            .vendor_id(id.vendor)
                            .product_id(id.product)
                            .register(
                                &context,
                                Box::new(CoralHotplug {
                                    notify: notify.clone(),
                                }),
                            )
                            .ok()
                    })
                    .collect();
                (registrations.len() == 2).then_some((context, registrations))
            });
            let _ = ready_tx.send(registered.is_some());
            if let Some((context, _registrations)) = registered {
                loop {
                    if context.handle_events(Some(Duration::from_secs(1))).is_err() {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .is_ok();
    spawned && ready_rx.recv().unwrap_or(false)
}

/// Forwards hotplug callbacks; never touches the device (libusb forbids
/// synchronous calls inside the callback).
struct CoralHotplug {
    notify: std::sync::Arc<dyn Fn() + Send + Sync>,
}

impl rusb::Hotplug<Context> for CoralHotplug {
    fn device_arrived(&mut self, _device: rusb::Device<Context>) {
        (self.notify)();
    }
    fn device_left(&mut self, _device: rusb::Device<Context>) {
        (self.notify)();
    }
}

//! The one file that talks to libusb (through rusb). Every listing and every
//! open starts from a fresh `rusb::Context` (never the global one, which
//! panics when libusb cannot start, and which a statically linked libusb
//! does not keep up to date across a re-enumeration).

use super::{
    CoralDevice, CoralState, InterfaceInfo, PortPath, ResetOutcome, UsbBus, UsbError, UsbId,
    UsbTransport,
};
use rusb::{Context, DeviceHandle, UsbContext};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Deadline of one control transfer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// The host's real USB bus.
#[derive(Debug)]
pub struct RusbBus {
    /// Root of sysfs, where the ports' `peer` links are read.
    sysfs: PathBuf,
}

impl Default for RusbBus {
    fn default() -> Self {
        Self::new()
    }
}

impl RusbBus {
    /// The real bus, with sysfs at `/sys` (umockdev redirects it in tests).
    pub fn new() -> Self {
        Self::with_sysfs("/sys")
    }

    /// The real bus, reading ports' peers under another sysfs root.
    pub fn with_sysfs(root: impl Into<PathBuf>) -> Self {
        RusbBus { sysfs: root.into() }
    }
}

/// The peer of the port `path` sits at, from sysfs: the symlink
/// `bus/usb/devices/<hub>/<hub interface>/<port>/peer` names the port on the
/// other root hub of the same physical connector (coral-dfu.md). None when
/// the port has no peer (USB 2 only) or sysfs does not say.
pub fn peer_port(sysfs: &Path, path: &PortPath) -> Option<PortPath> {
    let (parent, port) = path.sysfs_port();
    let hub = sysfs.join("bus/usb/devices").join(&parent);
    // The hub's interface directory: `usb1`'s is `1-0:1.0`, `1-1`'s is `1-1:1.0`.
    std::fs::read_dir(&hub)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().contains(':'))
        .find_map(|interface| {
            let target = std::fs::read_link(interface.path().join(&port).join("peer")).ok()?;
            PortPath::from_sysfs_port(&target.file_name()?.to_string_lossy())
        })
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

fn coral_of(device: &rusb::Device<Context>, sysfs: &Path) -> Option<CoralDevice> {
    let descriptor = device.device_descriptor().ok()?;
    let state = CoralState::from_id(UsbId {
        vendor: descriptor.vendor_id(),
        product: descriptor.product_id(),
    })?;
    let ports = device.port_numbers().ok()?;
    if ports.is_empty() {
        return None;
    }
    let path = PortPath::new(device.bus_number(), ports);
    Some(CoralDevice {
        peer: peer_port(sysfs, &path),
        path,
        address: device.address(),
        state,
    })
}

impl UsbBus for RusbBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        let context = context()?;
        let devices = context.devices().map_err(map_error)?;
        let mut corals: Vec<CoralDevice> = devices
            .iter()
            .filter_map(|d| coral_of(&d, &self.sysfs))
            .collect();
        corals.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(corals)
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        let context = context()?;
        let found = context
            .devices()
            .map_err(map_error)?
            .iter()
            .find(|d| coral_of(d, &self.sysfs).is_some_and(|c| c.same_enumeration(device)))
            .ok_or(UsbError::NoDevice)?;
        let handle = found.open().map_err(map_error)?;
        Ok(Box::new(RusbTransport { handle }))
    }

    fn qemu_node(&self, path: &str, domid: u32) -> super::NodeCheck {
        use super::qemu_node::{HostFiles, HostRoots, QemuNodes};
        let roots = HostRoots {
            sysfs: self.sysfs.clone(),
            ..HostRoots::from_env()
        };
        HostFiles::new(roots).check(path, domid)
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
        // Traced by the caller, which knows what the request means (`coral::dfu`).
        self.handle
            .read_control(request_type, request, value, index, buf, CONTROL_TIMEOUT)
            .map_err(map_error)
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, UsbError> {
        self.handle
            .write_control(request_type, request, value, index, data, CONTROL_TIMEOUT)
            .map_err(map_error)
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        match self.handle.reset() {
            Ok(()) => Ok(ResetOutcome::SameDevice),
            // The device left the bus to come back with other descriptors.
            Err(rusb::Error::NotFound | rusb::Error::NoDevice) => Ok(ResetOutcome::Reenumerating),
            // Any other failure: the procedure decides (after a verified
            // download it still waits for the device).
            Err(other) => Err(map_error(other)),
        }
    }
}

/// Calls `notify` whenever libusb reports a Coral (either identity) arriving
/// or leaving, from a thread of its own. `Ok(false)` when this libusb has no
/// hotplug support (the caller then relies on listings); an error when
/// libusb cannot start at all (never a panic: rusb's `has_hotplug()` would
/// start libusb's global context and panic when that fails, so the
/// registration itself is the test for support).
pub fn spawn_hotplug_listener(
    notify: std::sync::Arc<dyn Fn() + Send + Sync>,
) -> Result<bool, UsbError> {
    let context = context()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("usb-hotplug".into())
        .spawn(move || {
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
            let registered = (registrations.len() == 2).then_some((context, registrations));
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
    Ok(spawned && ready_rx.recv().unwrap_or(false))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_peer_links_of_root_and_hub_ports() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path();
        let port = |rel: &str| {
            std::fs::create_dir_all(sys.join(rel)).unwrap();
        };
        port("devices/usb1/1-0:1.0/usb1-port5");
        port("devices/usb2/2-0:1.0/usb2-port3");
        port("devices/usb1/1-1/1-1:1.0/1-1-port4");
        port("devices/usb2/2-1/2-1:1.0/2-1-port4");
        std::os::unix::fs::symlink(
            "../../../usb2/2-0:1.0/usb2-port3",
            sys.join("devices/usb1/1-0:1.0/usb1-port5/peer"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "../../../../usb2/2-1/2-1:1.0/2-1-port4",
            sys.join("devices/usb1/1-1/1-1:1.0/1-1-port4/peer"),
        )
        .unwrap();
        std::fs::create_dir_all(sys.join("bus/usb/devices")).unwrap();
        for (name, target) in [
            ("usb1", "../../../devices/usb1"),
            ("usb2", "../../../devices/usb2"),
            ("1-1", "../../../devices/usb1/1-1"),
        ] {
            std::os::unix::fs::symlink(target, sys.join("bus/usb/devices").join(name)).unwrap();
        }
        let peer = |p: &str| peer_port(sys, &p.parse().unwrap()).map(|p| p.to_string());
        assert_eq!(peer("1-5").as_deref(), Some("2-3"));
        assert_eq!(peer("1-1.4").as_deref(), Some("2-1.4"));
        assert_eq!(peer("2-3"), None, "no link on that side in this tree");
        assert_eq!(peer("1-7"), None);
        assert_eq!(peer("9-1"), None);
    }
}

//! USB port paths in sysfs form: `<bus>-<port>[.<port>…]`, e.g. `2-1.4`.
//! This is the string XAPI shows as a PUSB's `path`.

use std::fmt;
use std::str::FromStr;

/// A device's place in the USB tree: bus number and the chain of hub ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPath {
    /// Bus number.
    pub bus: u8,
    /// Port numbers from the root hub down (at least one).
    pub ports: Vec<u8>,
}

impl PortPath {
    /// A path from its parts.
    pub fn new(bus: u8, ports: Vec<u8>) -> Self {
        PortPath { bus, ports }
    }

    /// True when both are the same physical port chain, whatever the bus.
    ///
    /// A Coral's boot loader is USB 2 and its application mode USB 3; on an
    /// xHCI controller the two sit on different root hubs (buses) with the
    /// same port numbers, so `1-4` becomes `2-4` (see coral-dfu.md).
    pub fn same_port_chain(&self, other: &PortPath) -> bool {
        self.ports == other.ports
    }

    /// Where this device's port sits in sysfs: the parent device's name
    /// (`usb1` for a root-hub port, `1-1` for a port of the hub at `1-1`)
    /// and the port's own directory name (`usb1-port4`, `1-1-port4`).
    /// Linux puts the port under the hub's interface:
    /// `/sys/bus/usb/devices/<parent>/<parent interface>/<port>/peer`.
    pub fn sysfs_port(&self) -> (String, String) {
        let (last, hub_ports) = self.ports.split_last().expect("at least one port");
        let parent = if hub_ports.is_empty() {
            format!("usb{}", self.bus)
        } else {
            PortPath::new(self.bus, hub_ports.to_vec()).to_string()
        };
        let port = format!("{parent}-port{last}");
        (parent, port)
    }

    /// The device path a sysfs port directory name stands for:
    /// `usb2-port3` is `2-3`, `2-1-port4` is `2-1.4`.
    pub fn from_sysfs_port(name: &str) -> Option<PortPath> {
        let (parent, port) = name.rsplit_once("-port")?;
        let port = parse_number(port).filter(|&n| n > 0)?;
        let mut path = match parent.strip_prefix("usb") {
            Some(bus) => PortPath::new(parse_number(bus).filter(|&b| b > 0)?, Vec::new()),
            None => parent.parse().ok()?,
        };
        path.ports.push(port);
        (path.ports.len() <= 7).then_some(path)
    }
}

impl fmt::Display for PortPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-", self.bus)?;
        for (i, port) in self.ports.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

/// Why a string is not a port path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadPortPath(pub String);

impl fmt::Display for BadPortPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' is not a USB port path like 2-1 or 2-1.4", self.0)
    }
}

impl std::error::Error for BadPortPath {}

impl FromStr for PortPath {
    type Err = BadPortPath;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadPortPath(text.to_string());
        let (bus, chain) = text.split_once('-').ok_or_else(bad)?;
        let bus: u8 = parse_number(bus).ok_or_else(bad)?;
        let ports = chain
            .split('.')
            .map(|p| parse_number(p).filter(|&n| n > 0).ok_or_else(bad))
            .collect::<Result<Vec<u8>, _>>()?;
        if bus == 0 || ports.is_empty() || ports.len() > 7 {
            return Err(bad());
        }
        Ok(PortPath { bus, ports })
    }
}

fn parse_number(text: &str) -> Option<u8> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_sysfs_form() {
        for text in ["1-4", "2-1.4", "3-1.2.3"] {
            assert_eq!(text.parse::<PortPath>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn rejects_other_strings() {
        for text in [
            "", "1", "1-", "-1", "a-1", "1-0", "1-1..2", "1-1.x", "usb1", "1-+1",
        ] {
            assert!(text.parse::<PortPath>().is_err(), "{text}");
        }
    }

    #[test]
    fn sysfs_port_names_round_trip() {
        for (path, parent, port) in [
            ("1-4", "usb1", "usb1-port4"),
            ("2-1.4", "2-1", "2-1-port4"),
            ("3-1.2.3", "3-1.2", "3-1.2-port3"),
        ] {
            let path: PortPath = path.parse().unwrap();
            assert_eq!(path.sysfs_port(), (parent.to_string(), port.to_string()));
            assert_eq!(PortPath::from_sysfs_port(port), Some(path));
        }
        for bad in ["usb1", "usb0-port1", "1-port0", "x-port1", "usb1-portx", ""] {
            assert_eq!(PortPath::from_sysfs_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn same_port_chain_ignores_the_bus() {
        let boot: PortPath = "1-4".parse().unwrap();
        assert!(boot.same_port_chain(&"2-4".parse().unwrap()));
        assert!(!boot.same_port_chain(&"1-4.1".parse().unwrap()));
    }
}

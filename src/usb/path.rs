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
        write!(
            f,
            "'{}' is not a USB port path like 2-1 or 2-1.4 (see `coral status`)",
            self.0
        )
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
    fn same_port_chain_ignores_the_bus() {
        let boot: PortPath = "1-4".parse().unwrap();
        assert!(boot.same_port_chain(&"2-4".parse().unwrap()));
        assert!(!boot.same_port_chain(&"1-4.1".parse().unwrap()));
    }
}

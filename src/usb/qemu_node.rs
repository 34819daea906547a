//! Does a running VM's QEMU still hold the Coral at a port? A Coral that
//! re-enumerates as itself (a link drop, an xHCI reset) keeps its PUSB,
//! group and attached VUSB in XAPI, yet the guest has lost it: QEMU opened
//! the old `/dev/bus/usb/BBB/DDD` and may open no other (xapi-usb.md, "A
//! drop that XAPI does not see").
//!
//! At VM start xapi's `usb_reset.py attach <path> -d <domid>` marks the node
//! it hands to QEMU, and the marks outlive a re-enumeration while the new
//! node has none:
//! - 8.3 (`python3/libexec/usb_reset.py`, xapi-project/xen-api): a copy in
//!   QEMU's chroot, `/var/xen/qemu/root-<domid>/dev/bus/usb/BBB/DDD`;
//! - 8.2: the node's owner `qemu_base + domid` and `c 189:MINOR` in the
//!   cgroup `devices:/qemu-<domid>` list.
//!
//! `qemu_base` is no constant: usb_reset.py takes
//! `pwd.getpwnam("qemu_base").pw_uid`, the dom0 account of that name, so it
//! is read from the passwd file. This check is stateless: one-shot commands
//! use it; where no mark exists for the domain the answer is
//! [`NodeCheck::Unknown`], never a reason to restart.

use std::fmt;
use std::path::{Path, PathBuf};

/// The major number of usbfs device nodes.
const USB_DEVICE_MAJOR: u32 = 189;

/// Whether QEMU of a domain holds the device now at a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeCheck {
    /// The node at the port now is the one QEMU was given.
    Given,
    /// The domain has marks, and none is on the node at the port now: the
    /// device re-enumerated since the VM started; the guest has lost it.
    Lost {
        /// The node at the port now, e.g. `/dev/bus/usb/002/007`.
        node: String,
    },
    /// No mark for this domain (another xapi version, a test host), or no
    /// device at the port: nothing to conclude.
    Unknown(String),
}

impl fmt::Display for NodeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeCheck::Given => f.write_str("QEMU holds the device at the port"),
            NodeCheck::Lost { node } => write!(
                f,
                "the device re-enumerated as {node} after the VM started; QEMU still holds the old node"
            ),
            NodeCheck::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// The narrow question the procedures ask.
pub trait QemuNodes {
    /// Whether QEMU of domain `domid` holds the USB device now at `path`.
    fn check(&self, path: &str, domid: u32) -> NodeCheck;
}

/// Where the files the check reads live (each configurable, so tests can
/// point the check at a temporary tree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoots {
    /// sysfs (`/sys`): `bus/usb/devices/<path>/{busnum,devnum,dev}`.
    pub sysfs: PathBuf,
    /// `/dev`: `bus/usb/BBB/DDD`.
    pub dev: PathBuf,
    /// QEMU's chroots (`/var/xen/qemu`): `root-<domid>/dev/bus/usb/BBB/DDD`.
    pub qemu_chroots: PathBuf,
    /// The devices cgroup hierarchy (`/sys/fs/cgroup/devices`):
    /// `qemu-<domid>/devices.list`.
    pub cgroup_devices: PathBuf,
    /// The passwd file (`/etc/passwd`), for the `qemu_base` account.
    pub passwd: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        HostRoots {
            sysfs: "/sys".into(),
            dev: "/dev".into(),
            qemu_chroots: "/var/xen/qemu".into(),
            cgroup_devices: "/sys/fs/cgroup/devices".into(),
            passwd: "/etc/passwd".into(),
        }
    }
}

impl HostRoots {
    /// The real host's paths, with `CORAL_QEMU_ROOT`, `CORAL_CGROUP_DEVICES`
    /// and `CORAL_PASSWD` over the chroots, cgroup and passwd defaults.
    pub fn from_env() -> Self {
        let mut roots = HostRoots::default();
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(v) = var("CORAL_QEMU_ROOT") {
            roots.qemu_chroots = v.into();
        }
        if let Some(v) = var("CORAL_CGROUP_DEVICES") {
            roots.cgroup_devices = v.into();
        }
        if let Some(v) = var("CORAL_PASSWD") {
            roots.passwd = v.into();
        }
        roots
    }
}

/// The usbfs node of the device at a port, from sysfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsbNode {
    /// busnum.
    pub bus: u32,
    /// devnum.
    pub dev: u32,
    /// The node's minor number.
    pub minor: u32,
}

impl UsbNode {
    /// `bus/usb/BBB/DDD`, relative to `/dev` or a chroot's `dev`.
    pub fn relative(&self) -> String {
        format!("bus/usb/{:03}/{:03}", self.bus, self.dev)
    }
}

/// The device at `path` now: sysfs `busnum`, `devnum` and `dev` (major:minor;
/// computed as Linux numbers usbfs nodes when absent).
pub fn usb_node(sysfs: &Path, path: &str) -> Option<UsbNode> {
    let dir = sysfs.join("bus/usb/devices").join(path);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let bus: u32 = read("busnum")?.trim().parse().ok()?;
    let dev: u32 = read("devnum")?.trim().parse().ok()?;
    let minor = read("dev")
        .and_then(|d| {
            let (major, minor) = d.trim().split_once(':')?;
            (major == USB_DEVICE_MAJOR.to_string())
                .then(|| minor.parse().ok())
                .flatten()
        })
        .unwrap_or((bus.saturating_sub(1)) * 128 + dev.saturating_sub(1));
    Some(UsbNode { bus, dev, minor })
}

/// The `qemu_base` account's uid from a passwd file.
pub fn qemu_base_uid(passwd: &Path) -> Option<u32> {
    std::fs::read_to_string(passwd)
        .ok()?
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == "qemu_base").then_some(())?;
            fields.nth(1)?.parse().ok()
        })
}

/// The check over files under [`HostRoots`].
#[derive(Clone, Debug, Default)]
pub struct HostFiles {
    /// Where the files are.
    pub roots: HostRoots,
}

impl HostFiles {
    /// The check under `roots`.
    pub fn new(roots: HostRoots) -> Self {
        HostFiles { roots }
    }

    /// 8.3's mark: the chroot's usbfs nodes, if the domain has a chroot
    /// holding any (None: no such mark).
    fn chroot_nodes(&self, domid: u32) -> Option<Vec<String>> {
        let usb = self
            .roots
            .qemu_chroots
            .join(format!("root-{domid}"))
            .join("dev/bus/usb");
        let mut nodes = Vec::new();
        for bus in std::fs::read_dir(&usb).ok()?.flatten() {
            for dev in std::fs::read_dir(bus.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                nodes.push(format!(
                    "bus/usb/{}/{}",
                    bus.file_name().to_string_lossy(),
                    dev.file_name().to_string_lossy()
                ));
            }
        }
        (!nodes.is_empty()).then_some(nodes)
    }

    /// 8.2's mark: the usbfs minors the domain's devices cgroup allows
    /// (None: no list, or one that names no usbfs node).
    fn cgroup_minors(&self, domid: u32) -> Option<Vec<u32>> {
        let list = self
            .roots
            .cgroup_devices
            .join(format!("qemu-{domid}"))
            .join("devices.list");
        let text = std::fs::read_to_string(list).ok()?;
        let prefix = format!("c {USB_DEVICE_MAJOR}:");
        let minors: Vec<u32> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        (!minors.is_empty()).then_some(minors)
    }

    fn owner(&self, node: &UsbNode) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.roots.dev.join(node.relative()))
            .ok()
            .map(|m| m.uid())
    }
}

impl QemuNodes for HostFiles {
    fn check(&self, path: &str, domid: u32) -> NodeCheck {
        let Some(node) = usb_node(&self.roots.sysfs, path) else {
            return NodeCheck::Unknown(format!("no USB device at {path} in sysfs"));
        };
        let shown = format!("/dev/{}", node.relative());
        if let Some(nodes) = self.chroot_nodes(domid) {
            return if nodes.contains(&node.relative()) {
                NodeCheck::Given
            } else {
                NodeCheck::Lost { node: shown }
            };
        }
        if let Some(minors) = self.cgroup_minors(domid) {
            return if minors.contains(&node.minor) {
                NodeCheck::Given
            } else {
                NodeCheck::Lost { node: shown }
            };
        }
        match (qemu_base_uid(&self.roots.passwd), self.owner(&node)) {
            (Some(base), Some(uid)) if uid == base.saturating_add(domid) => NodeCheck::Given,
            _ => NodeCheck::Unknown(format!(
                "no mark of domain {domid}'s QEMU (chroot copy, devices cgroup, node owner)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A host tree: the Coral at 2-4 is `/dev/bus/usb/002/<dev>`.
    fn tree(dev: u32) -> (tempfile::TempDir, HostFiles) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let port = root.join("sys/bus/usb/devices/2-4");
        fs::create_dir_all(&port).unwrap();
        fs::write(port.join("busnum"), "2\n").unwrap();
        fs::write(port.join("devnum"), format!("{dev}\n")).unwrap();
        fs::write(port.join("dev"), format!("189:{}\n", 128 + dev - 1)).unwrap();
        fs::create_dir_all(root.join("dev/bus/usb/002")).unwrap();
        fs::write(root.join(format!("dev/bus/usb/002/{dev:03}")), "").unwrap();
        fs::write(
            root.join("passwd"),
            "root:x:0:0::/root:/bin/bash\nqemu_base:x:65536:65536::/:/sbin/nologin\n",
        )
        .unwrap();
        let files = HostFiles::new(HostRoots {
            sysfs: root.join("sys"),
            dev: root.join("dev"),
            qemu_chroots: root.join("qemu"),
            cgroup_devices: root.join("cgroup"),
            passwd: root.join("passwd"),
        });
        (dir, files)
    }

    #[test]
    fn the_chroot_copy_tells_given_from_lost() {
        let (dir, files) = tree(7);
        let chroot = dir.path().join("qemu/root-3/dev/bus/usb/002");
        fs::create_dir_all(&chroot).unwrap();
        fs::write(chroot.join("005"), "").unwrap();
        assert_eq!(
            files.check("2-4", 3),
            NodeCheck::Lost {
                node: "/dev/bus/usb/002/007".into()
            }
        );
        fs::write(chroot.join("007"), "").unwrap();
        assert_eq!(files.check("2-4", 3), NodeCheck::Given);
    }

    #[test]
    fn the_cgroup_list_tells_given_from_lost() {
        let (dir, files) = tree(7);
        let cg = dir.path().join("cgroup/qemu-3");
        fs::create_dir_all(&cg).unwrap();
        fs::write(cg.join("devices.list"), "c 1:3 rwm\nc 189:132 rwm\n").unwrap();
        assert!(matches!(files.check("2-4", 3), NodeCheck::Lost { .. }));
        fs::write(cg.join("devices.list"), "c 1:3 rwm\nc 189:134 rwm\n").unwrap();
        assert_eq!(files.check("2-4", 3), NodeCheck::Given);
    }

    #[test]
    fn no_mark_for_the_domain_is_unknown_never_lost() {
        let (dir, files) = tree(7);
        assert!(matches!(files.check("2-4", 3), NodeCheck::Unknown(_)));
        // Another domain's marks say nothing about domain 3.
        let chroot = dir.path().join("qemu/root-4/dev/bus/usb/002");
        fs::create_dir_all(&chroot).unwrap();
        fs::write(chroot.join("005"), "").unwrap();
        assert!(matches!(files.check("2-4", 3), NodeCheck::Unknown(_)));
        assert!(matches!(files.check("2-9", 3), NodeCheck::Unknown(_)));
    }

    #[test]
    fn qemu_base_comes_from_the_passwd_account() {
        let (dir, _) = tree(7);
        assert_eq!(qemu_base_uid(&dir.path().join("passwd")), Some(65536));
        assert_eq!(qemu_base_uid(&dir.path().join("absent")), None);
    }
}

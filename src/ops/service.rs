//! `coral service install|show|uninstall`: the boot-time oneshot unit that
//! runs `coral up` after xapi is ready and before XCP-ng auto-starts VMs.

use crate::error::{fail, FailureKind};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Unit file name.
pub const UNIT_NAME: &str = "coral-up.service";
/// Where the unit goes, relative to the root.
const UNIT_DIR: &str = "etc/systemd/system";
/// Start-up budget: re-enumeration (10 s) + XAPI scan (30 s) + clean
/// shutdown (180 s) + start (300 s) + lock wait, rounded up.
const TIMEOUT_START_SEC: u32 = 900;

/// What the unit runs.
#[derive(Clone, Debug, Default)]
pub struct ServiceSpec {
    /// Absolute path of the coral binary (ExecStart).
    pub exe: PathBuf,
    /// VM uuid or exact name-label.
    pub vm: String,
    /// Pass `--start`.
    pub start: bool,
    /// Pass `--restart`.
    pub restart: bool,
    /// Pass `--device`.
    pub device: Option<String>,
    /// Pass `--firmware`.
    pub firmware: Option<PathBuf>,
}

/// The unit text.
pub fn unit_text(spec: &ServiceSpec) -> String {
    let mut args = vec![
        spec.exe.display().to_string(),
        "up".to_string(),
        "--vm".to_string(),
        spec.vm.clone(),
    ];
    if spec.start {
        args.push("--start".into());
    }
    if spec.restart {
        args.push("--restart".into());
    }
    if let Some(device) = &spec.device {
        args.extend(["--device".to_string(), device.clone()]);
    }
    if let Some(firmware) = &spec.firmware {
        args.extend(["--firmware".to_string(), firmware.display().to_string()]);
    }
    let exec = args
        .iter()
        .map(|a| systemd_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Written by `coral service install`; remove with `coral service uninstall`.\n\
[Unit]\n\
Description=Initialize the Coral USB Accelerator and pass it to its VM before VMs auto-start\n\
Wants=xapi-init-complete.target\n\
After=xapi-init-complete.target\n\
Before=xapi-domains.service\n\
\n\
[Service]\n\
Type=oneshot\n\
RemainAfterExit=yes\n\
ExecStart={exec}\n\
TimeoutStartSec={TIMEOUT_START_SEC}\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n"
    )
}

/// One ExecStart argument per systemd.syntax(7): specifiers (`%`) and
/// variables (`$`) escaped; double-quoted with `\"`/`\\` when needed.
pub fn systemd_quote(arg: &str) -> String {
    let escaped = arg.replace('%', "%%").replace('$', "$$");
    let plain = !escaped.is_empty()
        && escaped
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+@,%$".contains(c));
    if plain {
        escaped
    } else {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn unit_path(root: Option<&Path>) -> PathBuf {
    root.unwrap_or(Path::new("/"))
        .join(UNIT_DIR)
        .join(UNIT_NAME)
}

/// Write the unit under `root` (default `/`), daemon-reload and enable (only without `root`).
pub fn install(spec: &ServiceSpec, root: Option<&Path>) -> anyhow::Result<String> {
    if !spec.exe.is_absolute() {
        return Err(fail(
            FailureKind::Other,
            format!(
                "ExecStart needs an absolute path, got {}",
                spec.exe.display()
            ),
        ));
    }
    let path = unit_path(root);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = path.with_extension("tmp");
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, unit_text(spec)))
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            fail(
                FailureKind::Other,
                format!("cannot write {}: {e}; run as root", path.display()),
            )
        })?;
    let mut text = format!("wrote {}\n", path.display());
    if root.is_none() {
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", UNIT_NAME])?;
        text.push_str(&format!("enabled {UNIT_NAME}: at boot it runs `coral up --vm {}` before XCP-ng auto-starts VMs\n", spec.vm));
    } else {
        text.push_str("--root given: systemctl not run\n");
    }
    if !spec.start {
        text.push_str("the VM must have auto_poweron (VM and pool other-config:auto_poweron=true, see README) to start with its Coral; or reinstall with --start");
    }
    Ok(text.trim_end().to_string())
}

/// The installed unit's text.
pub fn show(root: Option<&Path>) -> anyhow::Result<String> {
    let path = unit_path(root);
    std::fs::read_to_string(&path)
        .map(|t| t.trim_end().to_string())
        .map_err(|_| {
            fail(
                FailureKind::Other,
                format!(
                    "{} is not installed ({}); `coral service install --vm <vm>`",
                    UNIT_NAME,
                    path.display()
                ),
            )
        })
}

/// Disable and remove the unit.
pub fn uninstall(root: Option<&Path>) -> anyhow::Result<String> {
    let path = unit_path(root);
    if !path.exists() {
        return Ok(format!("{UNIT_NAME} is not installed; nothing to do"));
    }
    if root.is_none() {
        systemctl(&["disable", UNIT_NAME])?;
    }
    std::fs::remove_file(&path).map_err(|e| {
        fail(
            FailureKind::Other,
            format!("cannot remove {}: {e}", path.display()),
        )
    })?;
    if root.is_none() {
        systemctl(&["daemon-reload"])?;
    }
    Ok(format!("removed {}", path.display()))
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl").args(args).output().map_err(|e| {
        fail(
            FailureKind::Other,
            format!("cannot run systemctl ({e}); is this a systemd host?"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            FailureKind::Other,
            format!(
                "`systemctl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_names_for_systemd() {
        assert_eq!(systemd_quote("frigate"), "frigate");
        assert_eq!(systemd_quote("my vm"), "\"my vm\"");
        assert_eq!(systemd_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(systemd_quote("50%$HOME"), "50%%$$HOME");
    }
}

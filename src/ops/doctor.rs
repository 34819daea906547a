//! `coral doctor`: one read-only pass over everything the boot path depends
//! on, through the same code (firmware loading, USB listing, the `xe`
//! client, the config reader, the unit generator, the lock), each check with
//! its verdict and the fix. It never writes: no `xe` call that changes
//! anything, no file, no lock taken.

use super::attach::MAX_VUSBS_PER_VM;
use super::service::{self, Systemd, UnitSpec, AUTOSTART_UNIT, UNIT_NAME, WATCH_UNIT_NAME};
use crate::config::{self, Config, ConfigPath};
use crate::error::NextStep;
use crate::firmware::{FirmwareImage, FirmwareSource};
use crate::usb::{CoralDevice, CoralState, PortPath, UsbBus};
use crate::xe::client::{XeClient, CALL_TIMEOUT};
use crate::xe::parse::{minimal_list, records};
use crate::xe::XeRunner;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where XCP-ng keeps the filter of devices that may become PUSBs.
pub const USB_POLICY: &str = "/etc/xensource/usb-policy.conf";
/// Env var naming another usb-policy file (tests).
pub const USB_POLICY_ENV: &str = "CORAL_USB_POLICY";

/// A check's outcome. Warnings do not fail the doctor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// The boot path would fail here.
    Fail,
}

/// One check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Short name, e.g. `firmware`, `vm frigate`.
    pub name: String,
    /// Verdict.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do (absent when nothing is needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every check, in the boot path's order (`--json`: this, schema 1).
#[derive(Clone, Debug, Serialize)]
pub struct DoctorReport {
    /// JSON schema version.
    pub schema: u32,
    /// True when no check failed.
    pub passed: bool,
    /// The checks.
    pub checks: Vec<Check>,
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for check in &self.checks {
            let verdict = match check.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            writeln!(f, "{verdict:<5} {:<width$}  {}", check.name, check.detail)?;
            if let Some(fix) = &check.fix {
                writeln!(f, "      {:<width$}  fix: {fix}", "")?;
            }
        }
        let count = |v| self.checks.iter().filter(|c| c.verdict == v).count();
        write!(
            f,
            "doctor: {} ok, {} warning(s), {} failed",
            count(Verdict::Ok),
            count(Verdict::Warn),
            count(Verdict::Fail)
        )
    }
}

/// What the doctor looks at.
pub struct DoctorInputs<'a> {
    /// This binary (the unit's ExecStart) and its version.
    pub binary: (PathBuf, String),
    /// The firmware the boot path would load.
    pub load_firmware: &'a mut dyn FnMut() -> anyhow::Result<FirmwareImage>,
    /// USB.
    pub usb: &'a dyn UsbBus,
    /// `xe` and this host's uuid, or why they are not available.
    pub xapi: anyhow::Result<(&'a dyn XeRunner, String)>,
    /// The config file.
    pub config: ConfigPath,
    /// The root the units are under (None: `/`).
    pub root: Option<PathBuf>,
    /// How to ask whether units are enabled.
    pub systemd: Box<dyn Systemd>,
    /// `/etc/xensource/usb-policy.conf` (or its stand-in).
    pub usb_policy: PathBuf,
    /// What that file holds while it does not exist yet (a simulated host
    /// that nothing has written to has xapi's defaults); None: a real host.
    pub usb_policy_when_absent: Option<&'static str>,
    /// The lock file.
    pub lock_file: PathBuf,
    /// What coral remembers per mapping (pauses, the watcher's last action).
    pub state: crate::mapping_state::StateStore,
}

/// Run every check.
pub fn doctor(inputs: DoctorInputs<'_>) -> DoctorReport {
    let mut checks = Checks::default();
    let (exe, version) = &inputs.binary;
    checks.ok("binary", format!("{} (coral {version})", exe.display()));
    check_firmware(&mut checks, inputs.load_firmware);

    let config = match config::load(&inputs.config.file) {
        Ok(Some(config)) if !config.entries.is_empty() => {
            checks.ok(
                "config",
                format!(
                    "{}: {} entr{}",
                    inputs.config.file.display(),
                    config.entries.len(),
                    if config.entries.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    }
                ),
            );
            Some(config)
        }
        Ok(_) => {
            checks.fail(
                "config",
                format!("{}: no Coral → VM entry", inputs.config.file.display()),
                "coral service install --vm VM",
            );
            None
        }
        Err(err) => {
            checks.fail(
                "config",
                format!("{err:#}"),
                "fix the line named, or `coral service install --vm VM`",
            );
            None
        }
    };

    let xe = inputs
        .xapi
        .as_ref()
        .ok()
        .map(|(runner, host)| (*runner, XeClient::new(*runner, host.clone(), true)));
    let speeds = xe
        .as_ref()
        .and_then(|(runner, client)| pusb_speeds(*runner, client.host_uuid()).ok())
        .unwrap_or_default();
    check_corals(&mut checks, inputs.usb, config.as_ref(), &speeds);
    check_usb_policy(
        &mut checks,
        &inputs.usb_policy,
        inputs.usb_policy_when_absent,
    );

    match (&inputs.xapi, &xe) {
        (Ok((runner, host)), Some((_, client))) => {
            let answered = check_xapi(&mut checks, *runner, host);
            if let (true, Some(config)) = (answered, &config) {
                check_vms(&mut checks, *runner, client, config);
            }
            if answered {
                check_guest_nodes(&mut checks, inputs.usb, client);
            }
        }
        (Err(err), _) => checks.fail(
            "xapi",
            format!("{err:#}"),
            "run coral in an XCP-ng dom0 (CORAL_XE / CORAL_INVENTORY for tests)",
        ),
        (Ok(_), None) => {}
    }

    check_service(&mut checks, &inputs);

    check_watch_service(&mut checks, &inputs);
    match crate::lock::is_free(&inputs.lock_file) {
        _ if crate::lock::unsafe_reason(&inputs.lock_file).is_some() => checks.fail(
            "lock",
            format!(
                "{} {}",
                inputs.lock_file.display(),
                crate::lock::unsafe_reason(&inputs.lock_file).unwrap_or_default()
            ),
            crate::error::NextStep::RemoveUnsafe {
                path: inputs.lock_file.display().to_string(),
            }
            .to_string(),
        ),
        Ok(true) => checks.ok("lock", format!("{} is free", inputs.lock_file.display())),
        Ok(false) => checks.fail(
            "lock",
            format!("another coral run holds {}", inputs.lock_file.display()),
            "wait for it (`journalctl -u coral-up`), or find it: `fuser -v LOCKFILE`"
                .replace("LOCKFILE", &inputs.lock_file.display().to_string()),
        ),
        Err(e) => checks.fail(
            "lock",
            format!("cannot read {}: {e}", inputs.lock_file.display()),
            "run as root, or set --lock-file",
        ),
    }
    check_state(&mut checks, &inputs.state);
    let passed = checks.0.iter().all(|c| c.verdict != Verdict::Fail);
    DoctorReport {
        schema: 1,
        passed,
        checks: checks.0,
    }
}

/// The mapping state: readable, and no unreadable file kept aside (its
/// pauses are lost until the admin has redone them).
fn check_state(checks: &mut Checks, state: &crate::mapping_state::StateStore) {
    let problems = state.problems();
    let unfinished: Vec<String> = state
        .load()
        .unwrap_or_default()
        .mappings
        .into_iter()
        .filter(|(_, s)| s.restart_intent.is_some())
        .map(|(uuid, _)| uuid)
        .collect();
    if problems.is_empty() && !unfinished.is_empty() {
        checks.warn(
            "state",
            format!(
                "a restart coral began is unfinished for VM(s) {}: a run was killed or crashed between the shutdown and the start; the next `coral watch` check, `coral up` or `coral attach` starts the VM if it is halted",
                unfinished.join(", ")
            ),
            unfinished
                .iter()
                .map(|vm| NextStep::FinishRestart { vm: vm.clone() }.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        );
        return;
    }
    if problems.is_empty() {
        let states = state.load().unwrap_or_default();
        let paused = states.mappings.values().filter(|s| s.paused).count();
        checks.ok(
            "state",
            format!(
                "{}: {} mapping(s) recorded, {paused} paused",
                state.path().display(),
                states.mappings.len()
            ),
        );
        return;
    }
    let what: Vec<&str> = problems.iter().map(|(what, _)| what.as_str()).collect();
    let next: Vec<String> = problems.iter().map(|(_, next)| next.to_string()).collect();
    checks.fail("state", what.join("; "), next.join("; "));
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &str, verdict: Verdict, detail: String, fix: Option<String>) {
        self.0.push(Check {
            name: name.to_string(),
            verdict,
            detail,
            fix,
        });
    }
    fn ok(&mut self, name: &str, detail: String) {
        self.push(name, Verdict::Ok, detail, None);
    }
    fn warn(&mut self, name: &str, detail: String, fix: impl Into<String>) {
        self.push(name, Verdict::Warn, detail, Some(fix.into()));
    }
    fn fail(&mut self, name: &str, detail: String, fix: impl Into<String>) {
        self.push(name, Verdict::Fail, detail, Some(fix.into()));
    }
}

fn check_firmware(checks: &mut Checks, load: &mut dyn FnMut() -> anyhow::Result<FirmwareImage>) {
    match load() {
        Ok(image) if image.source == FirmwareSource::Simulated => checks.warn(
            "firmware",
            format!("simulation stand-in ({} bytes)", image.bytes.len()),
            "a real host needs the image: `coral firmware fetch` or `coral firmware install FILE`",
        ),
        Ok(image) => checks.ok(
            "firmware",
            format!(
                "{} from {} ({} bytes, sha256 {}… verified)",
                image
                    .known_name
                    .as_deref()
                    .unwrap_or("unknown image (allowed)"),
                image.source,
                image.bytes.len(),
                &image.sha256[..12.min(image.sha256.len())]
            ),
        ),
        Err(err) => checks.fail(
            "firmware",
            format!("{err:#}"),
            "`coral firmware fetch`, or `coral firmware install FILE`",
        ),
    }
}

/// Each ready Coral's link speed as XAPI reports it, by port path.
fn pusb_speeds(runner: &dyn XeRunner, host: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let out = runner.run(
        &[
            "pusb-list".into(),
            format!("host-uuid={host}"),
            "vendor-id=18d1".into(),
            "product-id=9302".into(),
            "params=path,speed".into(),
        ],
        CALL_TIMEOUT,
    )?;
    Ok(records(&out)
        .into_iter()
        .map(|r| {
            (
                r.get("path").cloned().unwrap_or_default(),
                r.get("speed").cloned().unwrap_or_default(),
            )
        })
        .collect())
}

fn check_corals(
    checks: &mut Checks,
    usb: &dyn UsbBus,
    config: Option<&Config>,
    speeds: &BTreeMap<String, String>,
) {
    let corals: Vec<CoralDevice> = match usb.list_corals() {
        Ok(corals) => corals,
        Err(e) => {
            checks.fail(
                "corals",
                format!("cannot list USB devices: {e}"),
                "run as root in dom0",
            );
            return;
        }
    };
    if corals.is_empty() {
        checks.fail(
            "corals",
            "no Coral on this host's USB (neither 1a6e:089a nor 18d1:9302)".into(),
            "plug the Coral in (a powered USB 3 port); `lsusb` should list it",
        );
    }
    for coral in &corals {
        let name = format!("coral {}", coral.path);
        let path = coral.path.to_string();
        match (coral.state, speeds.get(&path)) {
            (CoralState::Uninitialized, _) => checks.ok(
                &name,
                format!("{coral}: boot loader (USB 2 by design); `coral up` uploads the firmware"),
            ),
            (CoralState::Ready, Some(speed)) if speed.parse::<f64>().is_ok_and(|s| s < 5000.0) => {
                checks.warn(
                    &name,
                    format!("{coral}, link speed {} Mb/s (USB 2)", mbps(speed)),
                    "plug it into a USB 3 port with a USB 3 cable for full speed",
                )
            }
            (CoralState::Ready, Some(speed)) => checks.ok(
                &name,
                format!("{coral}, link speed {} Mb/s (USB 3)", mbps(speed)),
            ),
            (CoralState::Ready, None) => checks.warn(
                &name,
                format!("{coral}; XAPI does not list it (no PUSB), link speed unknown"),
                "`coral up` asks XAPI to scan; else check the usb-policy check below",
            ),
        }
    }
    if let Some(config) = config {
        check_configured_ports(checks, &corals, config);
    }
}

/// Whether a Coral is at `port` now: on any bus of its port chain (the boot
/// loader's `1-4` is the ready `2-4`), or at its peer (`1-5` ↔ `2-3`).
fn coral_at(corals: &[CoralDevice], port: &PortPath) -> bool {
    corals.iter().any(|c| c.at_configured_port(port))
}

/// Each config entry's port: FAIL when no Coral is there now. At boot
/// `coral up` would wait `--wait-device` for it, holding back VM auto-start,
/// then fail that entry. "Now" is all dom0 can tell honestly: sysfs keeps
/// no record of a port's past devices and the kernel log wraps, so the
/// detail says "now", not "since boot". The usual cause is a Coral moved to
/// another port and installed there without `--replace`: when the VM has an
/// entry whose Coral is present, or a Coral on USB is in no entry, the fix
/// is the `--replace` that moves the entry there.
fn check_configured_ports(checks: &mut Checks, corals: &[CoralDevice], config: &Config) {
    let present = |device: &str| device.parse().is_ok_and(|p| coral_at(corals, &p));
    // A Coral no entry names (an entry without a device names the only one).
    let claimed = |coral: &CoralDevice| {
        config.entries.iter().any(|e| match &e.device {
            Some(device) => device
                .parse()
                .is_ok_and(|p| coral_at(std::slice::from_ref(coral), &p)),
            None => true,
        })
    };
    let unclaimed: Vec<String> = corals
        .iter()
        .filter(|c| !claimed(c))
        .map(|c| c.path.to_string())
        .collect();
    for entry in &config.entries {
        let Some(device) = &entry.device else {
            continue;
        };
        if present(device) {
            continue;
        }
        let moved_to = config
            .entries
            .iter()
            .filter(|e| e.vm_uuid == entry.vm_uuid)
            .filter_map(|e| e.device.clone())
            .find(|d| present(d))
            .or_else(|| unclaimed.first().cloned());
        let fix = match moved_to {
            Some(to) => format!(
                "if the Coral moved to {to}: {} (drops this entry); else plug it back into {device}",
                NextStep::MoveEntry {
                    vm: entry.vm_uuid.clone(),
                    device: to.clone(),
                }
            ),
            None => format!(
                "plug it back into {device}, or {} with the path `coral status` shows",
                NextStep::MoveEntry {
                    vm: entry.vm_uuid.clone(),
                    device: "PATH".into(),
                }
            ),
        };
        checks.fail(
            &format!("coral {device}"),
            format!(
                "{} is configured for the Coral at {device}, but no Coral is at that port now (either bus, or its peer port); at boot `coral up` waits for it, then fails that entry",
                entry.label()
            ),
            fix,
        );
    }
}

/// `5000.000` → `5000`.
fn mbps(speed: &str) -> String {
    speed
        .parse::<f64>()
        .map(|s| format!("{s:.0}"))
        .unwrap_or_else(|_| speed.to_string())
}

/// A usb-policy.conf rule: ALLOW or DENY, and its matches.
struct PolicyRule {
    allow: bool,
    matches: Vec<(String, u32)>,
    /// Its line number and text, to name it.
    line: usize,
    text: String,
}

/// The interface a device shows, as the policy sees it.
struct PolicyDevice {
    vid: u32,
    pid: u32,
    class: u32,
    subclass: u32,
    prot: u32,
}

fn parse_policy(text: &str) -> Result<Vec<PolicyRule>, String> {
    let mut rules = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (action, rest) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: no ALLOW:/DENY:", n + 1))?;
        let allow = match action.trim().to_ascii_uppercase().as_str() {
            "ALLOW" => true,
            "DENY" => false,
            other => return Err(format!("line {}: unknown action {other}", n + 1)),
        };
        let mut matches = Vec::new();
        for part in rest.split_whitespace() {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("line {}: bad match {part}", n + 1))?;
            let value = u32::from_str_radix(value, 16)
                .map_err(|_| format!("line {}: {part} is not hex", n + 1))?;
            matches.push((key.to_ascii_lowercase(), value));
        }
        rules.push(PolicyRule {
            allow,
            matches,
            line: n + 1,
            text: line.to_string(),
        });
    }
    Ok(rules)
}

/// The first rule matching the device's interface decides (xapi applies the
/// policy per interface; each Coral identity has one); no rule: denied.
/// Ok, or Err with the denying rule (None: no rule matched).
fn policy_allows(rules: &[PolicyRule], device: &PolicyDevice) -> Result<(), Option<String>> {
    match deciding_rule(rules, device) {
        Some(rule) if rule.allow => Ok(()),
        Some(rule) => Err(Some(format!("line {}: `{}`", rule.line, rule.text))),
        None => Err(None),
    }
}

/// The first rule matching the device. A `rel` match (bcdDevice) is not
/// known here and counts as not matching.
fn deciding_rule<'r>(rules: &'r [PolicyRule], device: &PolicyDevice) -> Option<&'r PolicyRule> {
    rules.iter().find(|rule| {
        rule.matches.iter().all(|(key, value)| match key.as_str() {
            "class" => device.class == *value,
            "subclass" => device.subclass == *value,
            "prot" => device.prot == *value,
            "vid" => device.vid == *value,
            "pid" => device.pid == *value,
            _ => false,
        })
    })
}

/// How a denial reads: the rule that denies, or that none admits.
fn denied_by(rule: Option<String>) -> String {
    match rule {
        Some(rule) => format!("denied by {rule}"),
        None => "no rule matches it, so it is denied".into(),
    }
}

fn check_usb_policy(checks: &mut Checks, path: &Path, when_absent: Option<&str>) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && when_absent.is_some() => {
            when_absent.unwrap_or_default().to_string()
        }
        Err(e) => {
            checks.warn(
                "usb-policy",
                format!("cannot read {}: {e}", path.display()),
                "on XCP-ng the file decides which devices become PUSBs; reinstall xapi's default if it is gone",
            );
            return;
        }
    };
    let rules = match parse_policy(&text) {
        Ok(rules) => rules,
        Err(e) => {
            checks.fail(
                "usb-policy",
                format!("{}: {e}", path.display()),
                "fix the rule (syntax: ALLOW|DENY: class=ff vid=18d1 …)",
            );
            return;
        }
    };
    let ready = PolicyDevice {
        vid: 0x18d1,
        pid: 0x9302,
        class: 0xff,
        subclass: 0xff,
        prot: 0xff,
    };
    let boot_loader = PolicyDevice {
        vid: 0x1a6e,
        pid: 0x089a,
        class: 0xfe,
        subclass: 0x01,
        prot: 0x02,
    };
    let fix = format!(
        "add `ALLOW: vid=18d1 pid=9302` as the first rule of {} (package updates may overwrite it), then `coral up`",
        path.display()
    );
    match (policy_allows(&rules, &ready), policy_allows(&rules, &boot_loader)) {
        (Ok(()), Ok(())) => checks.ok(
            "usb-policy",
            format!("{} admits both identities: the ready Coral (class ff/ff/ff) and the boot loader (class fe/01/02)", path.display()),
        ),
        (Ok(()), Err(rule)) => checks.warn(
            "usb-policy",
            format!("{} does not admit the boot loader (1a6e:089a, class fe/01/02): {}; harmless for coral, which uploads the firmware in dom0", path.display(), denied_by(rule)),
            format!("to admit it, add `ALLOW: vid=1a6e pid=089a` as the first rule of {} (package updates may overwrite it)", path.display()),
        ),
        (Err(rule), _) => checks.fail(
            "usb-policy",
            format!("{} does not admit the ready Coral (18d1:9302, class ff/ff/ff): {}; XAPI will never list it", path.display(), denied_by(rule)),
            fix,
        ),
    }
}

/// `xe` answers and knows this host. Returns whether it answered.
fn check_xapi(checks: &mut Checks, runner: &dyn XeRunner, host: &str) -> bool {
    let out = runner.run(
        &[
            "host-list".into(),
            format!("uuid={host}"),
            "params=name-label".into(),
            "--minimal".into(),
        ],
        CALL_TIMEOUT,
    );
    match out {
        Ok(out) => match minimal_list(&out).first() {
            Some(name) => {
                checks.ok("xapi", format!("xe answers; this host is {host} ({name})"));
                true
            }
            None => {
                checks.fail(
                    "xapi",
                    format!("xe answers, but this pool has no host {host} (from the inventory)"),
                    "check INSTALLATION_UUID in /etc/xensource-inventory",
                );
                false
            }
        },
        Err(e) => {
            checks.fail(
                "xapi",
                format!("{e}"),
                "`systemctl status xapi`; at boot coral waits for it (README \"Boot budget\")",
            );
            false
        }
    }
}

/// A `k: v; k2: v2` map as xe prints it.
fn parse_map(text: &str) -> BTreeMap<String, String> {
    text.trim()
        .split("; ")
        .filter_map(|kv| kv.split_once(": "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn check_vms(checks: &mut Checks, runner: &dyn XeRunner, xe: &XeClient, config: &Config) {
    let pool_autostart = runner
        .run(
            &["pool-list".into(), "params=other-config".into()],
            CALL_TIMEOUT,
        )
        .ok()
        .and_then(|out| records(&out).into_iter().next())
        .and_then(|r| r.get("other-config").map(|m| parse_map(m)))
        .map(|m| m.get("auto_poweron").is_some_and(|v| v == "true"));
    for entry in &config.entries {
        let short = if entry.vm_name.is_empty() {
            entry.vm_uuid.clone()
        } else {
            entry.vm_name.clone()
        };
        let name = format!("vm {short}");
        let vm = match xe.find_vms(&entry.vm_uuid) {
            Ok(vms) => vms.into_iter().find(|v| v.uuid == entry.vm_uuid),
            Err(e) => {
                checks.fail(&name, format!("{e:#}"), "`systemctl status xapi`");
                continue;
            }
        };
        let Some(vm) = vm else {
            checks.fail(
                &name,
                format!(
                    "{}: no VM with this uuid in this pool (deleted, or another pool?)",
                    entry.label()
                ),
                format!(
                    "`coral service uninstall --vm {}`, then install the right VM",
                    entry.vm_uuid
                ),
            );
            continue;
        };
        if vm.ha_restart_priority == "restart" {
            checks.fail(
                &name,
                format!(
                    "{}: HA-protected (restart priority 'restart'); XAPI refuses it USB",
                    entry.label()
                ),
                format!(
                    "xe vm-param-set uuid={} ha-restart-priority=best-effort",
                    vm.uuid
                ),
            );
            continue;
        }
        match xe.vusbs_of_vm(&vm.uuid).map(|vusbs| vusbs.len()) {
            Ok(n) if n >= MAX_VUSBS_PER_VM => checks.fail(
                &name,
                format!("{}: {n} VUSBs, XAPI's limit is {MAX_VUSBS_PER_VM}", entry.label()),
                format!("remove one: `xe vusb-list vm-uuid={}`", vm.uuid),
            ),
            Ok(n) => checks.ok(
                &name,
                format!(
                    "{} exists in this pool ({}), not HA-protected, {n} of {MAX_VUSBS_PER_VM} VUSBs",
                    entry.label(),
                    vm.power_state
                ),
            ),
            Err(e) => checks.fail(&name, format!("{e:#}"), "`systemctl status xapi`"),
        }
        if entry.start {
            checks.ok(
                &format!("auto-start {short}"),
                "policy start: `coral up` starts the VM itself once the Coral is attached".into(),
            );
            continue;
        }
        let vm_autostart = runner
            .run(
                &[
                    "vm-param-get".into(),
                    format!("uuid={}", vm.uuid),
                    "param-name=other-config".into(),
                ],
                CALL_TIMEOUT,
            )
            .ok()
            .map(|out| {
                parse_map(&out)
                    .get("auto_poweron")
                    .is_some_and(|v| v == "true")
            });
        let name = format!("auto-start {short}");
        match (vm_autostart, pool_autostart) {
            (Some(true), Some(true)) => checks.ok(
                &name,
                "auto_poweron is set on the VM and the pool: XCP-ng starts it after coral-up"
                    .into(),
            ),
            (Some(vm_on), Some(pool_on)) => {
                let mut fixes = Vec::new();
                if !vm_on {
                    fixes.push(format!(
                        "xe vm-param-set uuid={} other-config:auto_poweron=true",
                        vm.uuid
                    ));
                }
                if !pool_on {
                    fixes.push("xe pool-param-set uuid=$(xe pool-list --minimal) other-config:auto_poweron=true".to_string());
                }
                checks.fail(
                    &name,
                    format!(
                        "the entry relies on auto-start, but auto_poweron is off on the {}",
                        match (vm_on, pool_on) {
                            (false, false) => "VM and the pool",
                            (false, true) => "VM",
                            _ => "pool",
                        }
                    ),
                    format!(
                        "{} (or `coral service install --vm {} --start`)",
                        fixes.join("; "),
                        vm.uuid
                    ),
                );
            }
            _ => checks.fail(
                &name,
                "could not read auto_poweron from xapi".into(),
                "`systemctl status xapi`",
            ),
        }
    }
    checks.warn(
        "backups",
        "a VM with a VUSB cannot be snapshotted, suspended or migrated (VM_HAS_VUSBS), so Xen Orchestra backups of it fail".into(),
        "back those VMs up from inside the guest, or `coral detach --vm VM` around the backup and `coral up` after",
    );
}

/// A Coral XAPI shows attached to a running VM whose QEMU lost it (it
/// re-enumerated after the VM started): the VM needs a restart. Only a
/// `lost` answer is reported; `unknown` says nothing.
fn check_guest_nodes(checks: &mut Checks, usb: &dyn UsbBus, xe: &XeClient) {
    let Ok(corals) = usb.list_corals() else {
        return;
    };
    let Ok(pusbs) = xe.ready_pusbs() else {
        return;
    };
    for coral in corals.iter().filter(|c| c.state == CoralState::Ready) {
        let path = coral.path.to_string();
        let Some(pusb) = pusbs.iter().find(|p| p.path == path) else {
            continue;
        };
        let Ok(vusbs) = xe.vusbs_of_group(&pusb.group) else {
            continue;
        };
        for vusb in vusbs.iter().filter(|v| v.attached) {
            if let crate::usb::NodeCheck::Lost { node } =
                super::xapi_common::guest_node(usb, xe, &vusb.vm_uuid, &path)
            {
                let name = xe
                    .param("vm", &vusb.vm_uuid, "name-label")
                    .map(|n| format!("'{}' ", n.escape_debug()))
                    .unwrap_or_default();
                checks.fail(
                    &format!("guest {path}"),
                    format!(
                        "the VM {name}({}) lost its Coral; it needs a restart: the Coral at {path} re-enumerated as {node} after the VM started, and XAPI still shows it attached",
                        vusb.vm_uuid
                    ),
                    format!("coral attach --vm {} --restart", vusb.vm_uuid),
                );
            }
        }
    }
}

fn check_service(checks: &mut Checks, inputs: &DoctorInputs<'_>) {
    let path = service::unit_path(inputs.root.as_deref(), UNIT_NAME);
    let installed = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(_) => {
            checks.fail(
                "service",
                format!("{UNIT_NAME} is not installed ({})", path.display()),
                "coral service install --vm VM",
            );
            return;
        }
    };
    let expected = service::boot_unit_text(&UnitSpec {
        exe: inputs.binary.0.clone(),
        config_env: inputs.config.from_env.clone(),
    });
    let has = |line: &str| installed.lines().any(|l| l.trim() == line);
    let ordered =
        has(&format!("Before={AUTOSTART_UNIT}")) && has("After=xapi-init-complete.target");
    let enabled = inputs.systemd.is_enabled(UNIT_NAME);
    match enabled {
        Ok(true) if ordered && installed == expected => checks.ok(
            "service",
            format!("{UNIT_NAME} installed, enabled, ordered before {AUTOSTART_UNIT}"),
        ),
        Ok(true) if ordered => checks.warn(
            "service",
            format!("{UNIT_NAME} installed, enabled, ordered before {AUTOSTART_UNIT}, but not as this coral writes it (older version or another path)"),
            "coral service install --vm VM (rewrites it)",
        ),
        Ok(true) => checks.fail(
            "service",
            format!("{} is not ordered before {AUTOSTART_UNIT}: VMs may start before their Coral", path.display()),
            "coral service install --vm VM (rewrites it)",
        ),
        Ok(false) => checks.fail(
            "service",
            format!("{UNIT_NAME} is installed but not enabled: it will not run at boot"),
            format!("systemctl enable {UNIT_NAME}"),
        ),
        Err(e) => checks.fail("service", format!("{e:#}"), "run coral doctor in dom0"),
    }
}

/// The watcher's unit: installed as this coral writes it, and enabled.
fn check_watch_service(checks: &mut Checks, inputs: &DoctorInputs<'_>) {
    let path = service::unit_path(inputs.root.as_deref(), WATCH_UNIT_NAME);
    let Ok(installed) = std::fs::read_to_string(&path) else {
        checks.fail(
            "watch",
            format!(
                "{WATCH_UNIT_NAME} is not installed ({}): a Coral that drops after boot stays lost",
                path.display()
            ),
            "coral service install --vm VM",
        );
        return;
    };
    let expected = service::watch_unit_text(&UnitSpec {
        exe: inputs.binary.0.clone(),
        config_env: inputs.config.from_env.clone(),
    });
    match inputs.systemd.is_enabled(WATCH_UNIT_NAME) {
        Ok(true) if installed == expected => checks.ok(
            "watch",
            format!(
                "{WATCH_UNIT_NAME} installed and enabled (`systemctl status {WATCH_UNIT_NAME}`)"
            ),
        ),
        Ok(true) => checks.warn(
            "watch",
            format!("{WATCH_UNIT_NAME} installed and enabled, but not as this coral writes it"),
            "coral service install --vm VM (rewrites it)",
        ),
        Ok(false) => checks.fail(
            "watch",
            format!("{WATCH_UNIT_NAME} is installed but not enabled"),
            format!("systemctl enable {WATCH_UNIT_NAME} && systemctl start {WATCH_UNIT_NAME}"),
        ),
        Err(e) => checks.fail("watch", format!("{e:#}"), "run coral doctor in dom0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_rule_decides() {
        let default = "DENY: class=02 # comm\nDENY: class=03 subclass=01 prot=01\nALLOW: # rest\n";
        let ready = PolicyDevice {
            vid: 0x18d1,
            pid: 0x9302,
            class: 0xff,
            subclass: 0xff,
            prot: 0xff,
        };
        assert!(policy_allows(&parse_policy(default).unwrap(), &ready).is_ok());
        let deny_ff = "DENY: class=ff\nALLOW:\n";
        assert_eq!(
            policy_allows(&parse_policy(deny_ff).unwrap(), &ready),
            Err(Some("line 1: `DENY: class=ff`".into()))
        );
        let allowed_first = "ALLOW: vid=18d1 pid=9302\nDENY: class=ff\nALLOW:\n";
        assert!(policy_allows(&parse_policy(allowed_first).unwrap(), &ready).is_ok());
        assert_eq!(
            policy_allows(&parse_policy("").unwrap(), &ready),
            Err(None),
            "no rule: denied"
        );
        assert!(parse_policy("PERMIT: class=ff").is_err());
    }

    #[test]
    fn a_configured_port_is_matched_by_chain_or_peer_never_by_numbers_alone() {
        let boot_loader = CoralDevice {
            path: "1-5".parse().unwrap(),
            address: 4,
            state: CoralState::Uninitialized,
            peer: Some("2-3".parse().unwrap()),
        };
        let corals = [boot_loader];
        let at = |port: &str| coral_at(&corals, &port.parse().unwrap());
        assert!(at("1-5") && at("2-5"), "either bus of its port chain");
        assert!(at("2-3"), "its peer (the ready Coral's port)");
        assert!(!at("2-4") && !at("1-5.1"), "another port");
        let config = Config {
            entries: vec![crate::config::Entry {
                vm_uuid: "3c6ef362-1f42-4a5d-9b1e-f6a9dbd967af".into(),
                device: Some("2-3".into()),
                ..Default::default()
            }],
        };
        let mut checks = Checks::default();
        check_configured_ports(&mut checks, &corals, &config);
        assert!(
            checks.0.is_empty(),
            "the peer's Coral counts: {:?}",
            checks.0
        );
    }

    #[test]
    fn maps_as_xe_prints_them() {
        let map = parse_map("auto_poweron: true; base_template_name: Debian\n");
        assert_eq!(map.get("auto_poweron").map(String::as_str), Some("true"));
        assert!(parse_map("").is_empty());
    }
}

//! `World::execute`: one `xe` command line against the pool, with the
//! outputs, preconditions and error texts of the fact sheet.

use super::world::ms;
use super::{
    CallRecord, CallResult, CliOutput, FaultKind, GuestShutdown, OutageKind, PendingPower,
    PowerState, Vusb, World,
};
use coral::simulate::xe_cli::{
    api, api_error, cli_error, field, list, map, param_get, set, Args, Failure, Outcome, Record,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// Most VUSBs a VM may have.
const MAX_VUSBS_PER_VM: usize = 6;

impl World {
    /// Run one `xe` command line (without the leading `xe`) at time `now`.
    pub fn execute(&mut self, sent: &[String], now: Duration) -> CallResult {
        self.advance(now);
        // `xe` joins its arguments with newlines; xapi splits them again.
        let args: Vec<String> = sent.join("\n").split('\n').map(str::to_string).collect();
        let args = args.as_slice();
        if let Some(outage) = self
            .outages
            .iter()
            .find(|o| o.from_ms <= ms(now) && ms(now) < o.until_ms)
        {
            let stderr = match outage.kind {
                OutageKind::Refused => "Error: Connection refused (calling connect )\n".to_string(),
                OutageKind::StillBooting => api_error("HOST_STILL_BOOTING", &[]),
            };
            self.record(sent, now, 1, 0);
            return CallResult {
                output: CliOutput {
                    status: 1,
                    stdout: String::new(),
                    stderr,
                },
                duration: Duration::ZERO,
            };
        }
        let command = args.first().cloned().unwrap_or_default();
        let nth = self
            .calls
            .iter()
            .filter(|c| c.args.first() == Some(&command))
            .count() as u32
            + 1;
        let fault = self
            .faults
            .iter()
            .find(|f| f.command == command && f.nth.is_none_or(|n| n == nth))
            .map(|f| f.kind.clone());
        let call_ms = self.config.call_ms;
        let (output, extra_ms): (Result<String, Failure>, u64) = match fault {
            Some(FaultKind::Hang) => {
                self.record(sent, now, 0, u64::MAX);
                return CallResult {
                    output: CliOutput::default(),
                    duration: Duration::MAX,
                };
            }
            Some(FaultKind::Fail { code, params }) => (Err(api(&code, &params)), 0),
            Some(FaultKind::Slow { ms: slow }) => {
                match self.dispatch(&command, &args[args.len().min(1)..], ms(now) + call_ms) {
                    Ok((stdout, extra)) => (Ok(stdout), extra + slow),
                    Err(failure) => (Err(failure), slow),
                }
            }
            None => match self.dispatch(&command, &args[args.len().min(1)..], ms(now) + call_ms) {
                Ok((stdout, extra)) => (Ok(stdout), extra),
                Err(failure) => (Err(failure), 0),
            },
        };
        let stdout_on_failure = std::mem::take(&mut self.failure_stdout);
        let failure_ms = std::mem::take(&mut self.failure_ms);
        let (output, extra_ms) = match output {
            Ok(stdout) => (
                CliOutput {
                    status: 0,
                    stdout,
                    stderr: String::new(),
                },
                extra_ms,
            ),
            Err(Failure(stderr)) => (
                CliOutput {
                    status: 1,
                    stdout: stdout_on_failure,
                    stderr,
                },
                extra_ms.max(failure_ms),
            ),
        };
        self.record(sent, now, output.status, call_ms + extra_ms);
        CallResult {
            output,
            duration: Duration::from_millis(call_ms + extra_ms),
        }
    }

    fn record(&mut self, args: &[String], now: Duration, status: i32, duration_ms: u64) {
        self.calls.push(CallRecord {
            at_ms: ms(now),
            args: args.to_vec(),
            status,
            duration_ms,
        });
    }

    /// Run a command whose work starts at `at_ms`; Ok(stdout, extra ms it took).
    fn dispatch(&mut self, command: &str, args: &[String], at_ms: u64) -> Outcome {
        let a = Args::parse(args)?;
        match command {
            "host-list" => list(&a, self.host_records(), &[]),
            "pool-list" => list(&a, self.pool_records(), &[]),
            "pusb-list" => list(&a, self.pusb_records(), &[]),
            "usb-group-list" => list(&a, self.group_records(), &[]),
            "vusb-list" => list(&a, self.vusb_records(), &[]),
            "vm-list" => self.vm_list(&a),
            "pusb-param-get" => param_get(&a, "PUSB", self.pusb_records()),
            "usb-group-param-get" => param_get(&a, "USB_group", self.group_records()),
            "vusb-param-get" => param_get(&a, "VUSB", self.vusb_records()),
            "vm-param-get" => param_get(&a, "VM", self.vm_records()),
            "host-param-get" => param_get(&a, "host", self.host_records()),
            "pusb-param-set" => self.pusb_param_set(&a),
            "pusb-scan" => {
                let host = a.require("host-uuid")?.to_string();
                if self.host(&host).is_none() {
                    return Err(api("UUID_INVALID", &["host".into(), host]));
                }
                self.schedule_scan(&host, Duration::from_millis(at_ms));
                Ok((String::new(), 0))
            }
            "vusb-create" => self.vusb_create(&a),
            "vusb-unplug" => self.vusb_unplug(&a),
            "vusb-destroy" => self.vusb_destroy(&a),
            "vm-start" => self.vm_start(&a, at_ms),
            "vm-shutdown" => self.vm_shutdown(&a, at_ms),
            _ => Err(cli_error(&format!(
                "Unknown command: {command}\nFor usage run: 'xe help'"
            ))),
        }
    }

    fn vm_list(&self, a: &Args) -> Outcome {
        // Templates are hidden unless asked for.
        let mut records = self.vm_records();
        if a.get("is-a-template").is_none() {
            records.retain(|r| {
                r.iter()
                    .any(|f| f.name == "is-a-template" && f.value == "false")
            });
        }
        list(a, records, &["uuid", "name-label", "power-state"])
    }

    fn pusb_param_set(&mut self, a: &Args) -> Outcome {
        let uuid = a.require("uuid")?.to_string();
        let value = a.require("passthrough-enabled")?;
        let enabled = match value {
            "true" => true,
            "false" => false,
            other => {
                return Err(cli_error(&format!(
                    "Error: failed to parse parameter 'passthrough-enabled': expecting 'true' or 'false', got '{other}'"
                )))
            }
        };
        let pusb = self
            .pusbs
            .iter()
            .find(|p| p.uuid == uuid)
            .cloned()
            .ok_or_else(|| api("UUID_INVALID", &["PUSB".into(), uuid.clone()]))?;
        if !enabled {
            let on_group: Vec<&Vusb> = self
                .vusbs
                .iter()
                .filter(|v| v.usb_group_uuid == pusb.usb_group_uuid)
                .collect();
            if let Some(attached) = on_group.iter().find(|v| v.currently_attached) {
                return Err(api(
                    "USB_ALREADY_ATTACHED",
                    &[pusb.uuid.clone(), attached.vm_uuid.clone()],
                ));
            }
            self.vusbs
                .retain(|v| v.usb_group_uuid != pusb.usb_group_uuid);
        }
        if let Some(p) = self.pusbs.iter_mut().find(|p| p.uuid == uuid) {
            p.passthrough_enabled = enabled;
        }
        Ok((String::new(), 0))
    }

    fn vusb_create(&mut self, a: &Args) -> Outcome {
        let group = a.require("usb-group-uuid")?.to_string();
        let vm_uuid = a.require("vm-uuid")?.to_string();
        let vm = self
            .vm(&vm_uuid)
            .cloned()
            .ok_or_else(|| api("UUID_INVALID", &["VM".into(), vm_uuid.clone()]))?;
        if !self.groups.iter().any(|g| g.uuid == group) {
            return Err(api("UUID_INVALID", &["USB_group".into(), group]));
        }
        let of_vm = self.vusbs.iter().filter(|v| v.vm_uuid == vm_uuid).count();
        if of_vm >= MAX_VUSBS_PER_VM {
            return Err(api("TOO_MANY_VUSBS", &[MAX_VUSBS_PER_VM.to_string()]));
        }
        if self.vusbs.iter().any(|v| v.usb_group_uuid == group) {
            return Err(api("USB_GROUP_CONFLICT", &[group]));
        }
        if vm.ha_restart_priority == "restart" {
            return Err(api(
                "OPERATION_NOT_ALLOWED",
                &["VM has HA restart priority 'restart': USB passthrough is not allowed".into()],
            ));
        }
        let uuid = self.new_uuid();
        self.vusbs.push(Vusb {
            uuid: uuid.clone(),
            vm_uuid,
            usb_group_uuid: group,
            currently_attached: false,
            other_config: BTreeMap::new(),
        });
        Ok((format!("{uuid}\n"), 0))
    }

    fn find_vusb(&self, a: &Args) -> Result<Vusb, Failure> {
        let uuid = a.require("uuid")?;
        self.vusbs
            .iter()
            .find(|v| v.uuid == uuid)
            .cloned()
            .ok_or_else(|| api("UUID_INVALID", &["VUSB".into(), uuid.to_string()]))
    }

    fn vusb_unplug(&mut self, a: &Args) -> Outcome {
        let vusb = self.find_vusb(a)?;
        let running = self
            .vm(&vusb.vm_uuid)
            .is_some_and(|v| v.power_state == PowerState::Running);
        if !running || !vusb.currently_attached {
            return Err(api(
                "OPERATION_NOT_ALLOWED",
                &["VUSB is not currently attached".into()],
            ));
        }
        if let Some(v) = self.vusbs.iter_mut().find(|v| v.uuid == vusb.uuid) {
            v.currently_attached = false;
        }
        Ok((String::new(), 0))
    }

    fn vusb_destroy(&mut self, a: &Args) -> Outcome {
        let vusb = self.find_vusb(a)?;
        if vusb.currently_attached {
            return Err(api(
                "OPERATION_NOT_ALLOWED",
                &["VUSB is currently attached; unplug it first".into()],
            ));
        }
        self.vusbs.retain(|v| v.uuid != vusb.uuid);
        Ok((String::new(), 0))
    }

    /// The VMs a power command selects: `uuid=`, `vm=` (name or uuid), or field filters.
    fn select_vms(&self, a: &Args) -> Result<Vec<String>, Failure> {
        let candidates: Vec<&super::Vm> = self
            .vms
            .iter()
            .filter(|v| !v.is_a_template && !v.is_a_snapshot && !v.is_control_domain)
            .collect();
        let selected: Vec<String> = if let Some(uuid) = a.get("uuid") {
            candidates
                .iter()
                .filter(|v| v.uuid == uuid)
                .map(|v| v.uuid.clone())
                .collect()
        } else if let Some(vm) = a.get("vm") {
            candidates
                .iter()
                .filter(|v| v.uuid == vm || v.name_label == vm)
                .map(|v| v.uuid.clone())
                .collect()
        } else {
            let filters = a.filters(&["force", "on", "params"]);
            let records = self.vm_records();
            records
                .iter()
                .filter(|r| {
                    filters
                        .iter()
                        .all(|(k, v)| r.iter().any(|f| f.name == *k && f.value == *v))
                })
                .filter_map(|r| r.first().map(|f| f.value.clone()))
                .filter(|u| candidates.iter().any(|c| &c.uuid == u))
                .collect()
        };
        match selected.len() {
            0 => Err(cli_error("Error: No matching VMs found")),
            1 => Ok(selected),
            _ if a.multiple => Ok(selected),
            _ => Err(cli_error(
                "Error: Multiple matches VMs found. --multiple required to complete the operation",
            )),
        }
    }

    fn bad_power(&self, uuid: &str, expected: &str) -> Failure {
        let vm = self.vm(uuid);
        let name = vm.map(|v| v.name_label.clone()).unwrap_or_default();
        let actual = vm.map(|v| power_name(v.power_state)).unwrap_or("halted");
        api(
            "VM_BAD_POWER_STATE",
            &[format!("{uuid} ({name})"), expected.into(), actual.into()],
        )
    }

    fn busy(&self, uuid: &str) -> Option<Failure> {
        (!self.current_operations(uuid).is_empty()).then(|| {
            api(
                "OTHER_OPERATION_IN_PROGRESS",
                &["VM".into(), uuid.to_string()],
            )
        })
    }

    fn vm_start(&mut self, a: &Args, at_ms: u64) -> Outcome {
        let mut took = 0;
        for uuid in self.select_vms(a)? {
            let vm = self
                .vm(&uuid)
                .cloned()
                .ok_or_else(|| cli_error("Error: No matching VMs found"))?;
            if let Some(busy) = self.busy(&uuid) {
                return Err(busy);
            }
            if vm.power_state != PowerState::Halted {
                return Err(self.bad_power(&uuid, "halted"));
            }
            // assert_usbs_available: one host must hold every VUSB's PUSB.
            let hosts = self.vusb_hosts(&uuid);
            let mut distinct: Vec<&Option<String>> = Vec::new();
            for h in &hosts {
                if !distinct.contains(&h) {
                    distinct.push(h);
                }
            }
            if distinct.len() > 1 || distinct.iter().any(|h| h.is_none()) {
                self.failure_stdout = self
                    .hosts
                    .iter()
                    .map(|h| {
                        format!(
                            "{} ({}): the VM's USB devices are not all on this host\n",
                            h.name_label, h.uuid
                        )
                    })
                    .collect();
                return Err(api("NO_HOSTS_AVAILABLE", &[]));
            }
            if !hosts.is_empty() && self.usb_reset_failures > 0 {
                self.usb_reset_failures -= 1;
                self.failure_ms = self.config.start_ms / 2;
                return Err(api("INTERNAL_ERROR", &[super::USB_RESET_FAILURE.into()]));
            }
            took = took.max(self.config.start_ms);
            // The start builds a new domain (usb_reset.py marks the
            // device's node for it before the guest runs).
            let dom_id = self.new_dom_id();
            if let Some(vm) = self.vm_mut(&uuid) {
                vm.dom_id = dom_id;
            }
            self.pending_power.push(PendingPower {
                vm_uuid: uuid,
                to: PowerState::Running,
                due_ms: at_ms + self.config.start_ms,
                operation: "start".into(),
                fails: false,
            });
        }
        // The call returns once the VM runs.
        Ok((String::new(), took))
    }

    fn vm_shutdown(&mut self, a: &Args, at_ms: u64) -> Outcome {
        let force = a.get("force") == Some("true");
        let mut took = 0;
        for uuid in self.select_vms(a)? {
            let vm = self
                .vm(&uuid)
                .cloned()
                .ok_or_else(|| cli_error("Error: No matching VMs found"))?;
            let ops = self.current_operations(&uuid);
            if force && ops.iter().all(|o| o == "clean_shutdown") && !ops.is_empty() {
                // A hard shutdown is allowed meanwhile and voids the clean one.
                self.pending_power.retain(|p| p.vm_uuid != uuid);
            } else if let Some(busy) = self.busy(&uuid) {
                return Err(busy);
            }
            if vm.power_state != PowerState::Running {
                return Err(self.bad_power(&uuid, "running"));
            }
            let vm_param = format!("{uuid} ({})", vm.name_label);
            let (delay, fails, error) = match (force, vm.guest_shutdown) {
                (true, _) => (0, false, None),
                (false, GuestShutdown::Cooperates) => (self.config.shutdown_ms, false, None),
                (false, GuestShutdown::NeverAcknowledges) => (
                    self.config.ack_timeout_ms,
                    true,
                    Some(api("VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT", &[vm_param])),
                ),
                (false, GuestShutdown::NeverHalts) => (
                    self.config.shutdown_timeout_ms,
                    true,
                    Some(api(
                        "VM_SHUTDOWN_TIMEOUT",
                        &[
                            vm_param,
                            format!("{}.", self.config.shutdown_timeout_ms / 1000),
                        ],
                    )),
                ),
            };
            let operation = if force {
                "hard_shutdown"
            } else {
                "clean_shutdown"
            };
            self.pending_power.push(PendingPower {
                vm_uuid: uuid,
                to: PowerState::Halted,
                due_ms: at_ms + delay,
                operation: operation.into(),
                fails,
            });
            if let Some(error) = error {
                self.failure_ms = delay;
                return Err(error);
            }
            took = took.max(delay);
        }
        Ok((String::new(), took))
    }

    // -- records ------------------------------------------------------------

    fn host_records(&self) -> Vec<Record> {
        self.hosts
            .iter()
            .map(|h| {
                vec![
                    field("uuid", "RO", &h.uuid),
                    field("name-label", "RW", &h.name_label),
                    field("name-description", "RW", ""),
                ]
            })
            .collect()
    }

    fn pool_records(&self) -> Vec<Record> {
        let uuid = if self.pool.uuid.is_empty() {
            "00000000-0000-4000-8000-00000000f001"
        } else {
            self.pool.uuid.as_str()
        };
        let master = self
            .hosts
            .first()
            .map(|h| h.uuid.clone())
            .unwrap_or_default();
        vec![vec![
            field("uuid", "RO", uuid),
            field("name-label", "RW", &self.pool.name_label),
            field("name-description", "RW", ""),
            field("master", "RO", master),
            field("default-SR", "RW", "<not in database>"),
            field("other-config", "MRW", map(&self.pool.other_config)),
        ]]
    }

    fn pusb_records(&self) -> Vec<Record> {
        self.pusbs
            .iter()
            .map(|p| {
                let d = &p.device;
                let host_name = self
                    .host(&p.host_uuid)
                    .map(|h| h.name_label.clone())
                    .unwrap_or_default();
                let mut description = d.vendor_desc.clone();
                for part in [&d.product_desc, &d.serial] {
                    if !part.is_empty() {
                        description.push('_');
                        description.push_str(part);
                    }
                }
                vec![
                    field("uuid", "RO", &p.uuid),
                    field("usb-group-uuid", "RO", &p.usb_group_uuid),
                    field("host-uuid", "RO", &p.host_uuid),
                    field("host-name-label", "RO", host_name),
                    field("path", "RO", &d.path),
                    field("vendor-id", "RO", &d.vendor_id),
                    field("vendor-desc", "RO", &d.vendor_desc),
                    field("product-id", "RO", &d.product_id),
                    field("product-desc", "RO", &d.product_desc),
                    field("serial", "RO", &d.serial),
                    field("version", "RO", &d.version),
                    field("description", "RO", description),
                    field("speed", "RO", &d.speed),
                    field(
                        "passthrough-enabled",
                        "RW",
                        p.passthrough_enabled.to_string(),
                    ),
                ]
            })
            .collect()
    }

    fn group_records(&self) -> Vec<Record> {
        self.groups
            .iter()
            .map(|g| {
                let vusbs: Vec<String> = self
                    .vusbs
                    .iter()
                    .filter(|v| v.usb_group_uuid == g.uuid)
                    .map(|v| v.uuid.clone())
                    .collect();
                let pusbs: Vec<String> = self
                    .pusbs
                    .iter()
                    .filter(|p| p.usb_group_uuid == g.uuid)
                    .map(|p| p.uuid.clone())
                    .collect();
                vec![
                    field("uuid", "RO", &g.uuid),
                    field("name-label", "RW", &g.name_label),
                    field("name-description", "RW", &g.name_description),
                    field("VUSB-uuids", "SRO", set(&vusbs)),
                    field("PUSB-uuids", "SRO", set(&pusbs)),
                    field("other-config", "MRW", map(&g.other_config)),
                ]
            })
            .collect()
    }

    fn vusb_records(&self) -> Vec<Record> {
        self.vusbs
            .iter()
            .map(|v| {
                let vm_name = self
                    .vm(&v.vm_uuid)
                    .map(|vm| vm.name_label.clone())
                    .unwrap_or_default();
                let group_name = self
                    .groups
                    .iter()
                    .find(|g| g.uuid == v.usb_group_uuid)
                    .map(|g| g.name_label.clone())
                    .unwrap_or_default();
                let allowed = if v.currently_attached {
                    "unplug"
                } else {
                    "destroy"
                };
                vec![
                    field("uuid", "RO", &v.uuid),
                    field("vm-uuid", "RO", &v.vm_uuid),
                    field("vm-name-label", "RO", vm_name),
                    field("usb-group-uuid", "RO", &v.usb_group_uuid),
                    field("usb-group-name-label", "RO", group_name),
                    field("other-config", "MRW", map(&v.other_config)),
                    field("currently-attached", "RO", v.currently_attached.to_string()),
                    field("allowed-operations", "SRO", allowed),
                    field("current-operations", "SRO", ""),
                ]
            })
            .collect()
    }

    fn vm_records(&self) -> Vec<Record> {
        self.vms
            .iter()
            .map(|v| {
                vec![
                    field("uuid", "RO", &v.uuid),
                    field("name-label", "RW", &v.name_label),
                    field("name-description", "RW", ""),
                    field("is-a-template", "RW", v.is_a_template.to_string()),
                    field("is-a-snapshot", "RO", v.is_a_snapshot.to_string()),
                    field("is-control-domain", "RO", v.is_control_domain.to_string()),
                    field("power-state", "RO", power_name(v.power_state)),
                    field("other-config", "MRW", map(&v.other_config)),
                    field(
                        "current-operations",
                        "SRO",
                        set(&self.current_operations(&v.uuid)),
                    ),
                    field(
                        "resident-on",
                        "RO",
                        v.resident_on
                            .clone()
                            .unwrap_or_else(|| "<not in database>".into()),
                    ),
                    field("ha-restart-priority", "RW", &v.ha_restart_priority),
                    field("dom-id", "RO", v.dom_id.to_string()),
                ]
            })
            .collect()
    }
}

/// XAPI's name of a power state.
pub(super) fn power_name(state: PowerState) -> &'static str {
    match state {
        PowerState::Halted => "halted",
        PowerState::Paused => "paused",
        PowerState::Running => "running",
        PowerState::Suspended => "suspended",
    }
}

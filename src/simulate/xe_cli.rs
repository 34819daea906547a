//! The `xe` command line as a simulated pool sees it and prints its
//! answers: `key=value` arguments and flags, records (`params=`),
//! `--minimal` lists and error texts, as the fact sheet (`xapi-usb.md`)
//! describes them. Shared by the `--simulate` pool and the test kit's.

/// One field of a record: name, access tag (`RO`, `RW`, `SRO`, `MRW`), value.
pub struct Field {
    /// Field name, e.g. `power-state`.
    pub name: &'static str,
    /// Access tag.
    pub access: &'static str,
    /// Value as xe prints it.
    pub value: String,
}

/// A field.
pub fn field(name: &'static str, access: &'static str, value: impl Into<String>) -> Field {
    Field {
        name,
        access,
        value: value.into(),
    }
}

/// A record's fields in record order.
pub type Record = Vec<Field>;

/// Human output of records: per record its fields one a line (first label
/// padded right, later ones left, to 4 + the longest label), then two empty lines.
pub fn human(records: &[Vec<&Field>]) -> String {
    let mut out = String::new();
    for record in records {
        let labels: Vec<String> = record
            .iter()
            .map(|f| format!("{} ({:>3})", f.name, f.access))
            .collect();
        let width = 4 + labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        for (i, (label, f)) in labels.iter().zip(record).enumerate() {
            if i == 0 {
                out.push_str(&format!("{label:<width$}: {}\n", f.value));
            } else {
                out.push_str(&format!("{label:>width$}: {}\n", f.value));
            }
        }
        out.push_str("\n\n");
    }
    out
}

/// `--minimal`: the first shown column of each record, `,`-joined with `\,` and `\\` escapes.
pub fn minimal(records: &[Vec<&Field>]) -> String {
    let values: Vec<String> = records
        .iter()
        .filter_map(|r| r.first())
        .map(|f| f.value.replace('\\', "\\\\").replace(',', "\\,"))
        .collect();
    format!("{}\n", values.join(","))
}

/// A set value as xe prints it.
pub fn set(items: &[String]) -> String {
    items.join("; ")
}

/// A map value as xe prints it.
pub fn map(items: &std::collections::BTreeMap<String, String>) -> String {
    items
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The description xe prints for the API errors the simulation raises
/// (texts from xapi's `ocaml/idl/datamodel_errors.ml`).
fn describe(code: &str) -> Option<&'static str> {
    Some(match code {
        "VM_BAD_POWER_STATE" => "You attempted an operation on a VM that was not in an appropriate power state at the time; for example, you attempted to start a VM that was already running.  The parameters returned are the VM's handle, and the expected and actual VM state at the time of the call.",
        "UUID_INVALID" => "The uuid you supplied was invalid.",
        "HANDLE_INVALID" => "You gave an invalid object reference.  The object may have recently been deleted.  The class parameter gives the type of reference given, and the handle parameter echoes the bad value given.",
        "OPERATION_NOT_ALLOWED" => "You attempted an operation that was not allowed.",
        "TOO_MANY_VUSBS" => "The VM has too many VUSBs.",
        "USB_GROUP_CONFLICT" => "USB_groups are currently restricted to contain no more than one VUSB.",
        "USB_ALREADY_ATTACHED" => "The USB device is currently attached to a VM.",
        "VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT" => "VM didn't acknowledge the need to shutdown.",
        "VM_SHUTDOWN_TIMEOUT" => "VM failed to shutdown before the timeout expired",
        "OTHER_OPERATION_IN_PROGRESS" => "Another operation involving the object is currently in progress",
        "NO_HOSTS_AVAILABLE" => "There were no hosts available to complete the specified operation.",
        "HOST_STILL_BOOTING" => "The host toolstack is still initialising. Please wait.",
        "INTERNAL_ERROR" => "The server failed to handle your request, due to an internal error.  The given message may give details useful for debugging the problem.",
        _ => return None,
    })
}

/// Parameter names of those errors, in order.
fn param_names(code: &str) -> &'static [&'static str] {
    match code {
        "VM_BAD_POWER_STATE" => &["vm", "expected", "actual"],
        "UUID_INVALID" => &["type", "uuid"],
        "HANDLE_INVALID" => &["class", "handle"],
        "OPERATION_NOT_ALLOWED" => &["reason"],
        "TOO_MANY_VUSBS" => &["number"],
        "USB_GROUP_CONFLICT" => &["USB_group"],
        "USB_ALREADY_ATTACHED" => &["PUSB", "VM"],
        "VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT" => &["vm"],
        "VM_SHUTDOWN_TIMEOUT" => &["vm", "timeout"],
        "INTERNAL_ERROR" => &["message"],
        "OTHER_OPERATION_IN_PROGRESS" => &["class", "object"],
        _ => &[],
    }
}

/// An API error as xe prints it on stderr: the description and one
/// `param: value` line per parameter; unknown codes as `Error code:` /
/// `Error parameters:`.
pub fn api_error(code: &str, params: &[String]) -> String {
    match describe(code) {
        Some(text) => {
            let mut out = format!("{text}\n");
            for (name, value) in param_names(code).iter().zip(params) {
                out.push_str(&format!("{name}: {value}\n"));
            }
            out
        }
        None => format!(
            "Error code: {code}\nError parameters: {}\n",
            params.join(", ")
        ),
    }
}

/// A failed command: what xe prints on stderr (exit status 1).
#[derive(Debug)]
pub struct Failure(pub String);

/// The result of one command: stdout and the extra time it took (ms).
pub type Outcome = Result<(String, u64), Failure>;

/// An API error, as a failure.
pub fn api(code: &str, params: &[String]) -> Failure {
    Failure(api_error(code, params))
}

/// A command-line error, as a failure.
pub fn cli_error(text: &str) -> Failure {
    Failure(format!("{text}\n"))
}

/// A parsed command line: `key=value` arguments and `--flags`.
pub struct Args {
    /// The `key=value` arguments, in order.
    pub params: Vec<(String, String)>,
    /// `--minimal`.
    pub minimal: bool,
    /// `--multiple`.
    pub multiple: bool,
}

impl Args {
    /// Parse the arguments after the command name.
    pub fn parse(args: &[String]) -> Result<Args, Failure> {
        let mut parsed = Args {
            params: Vec::new(),
            minimal: false,
            multiple: false,
        };
        for arg in args {
            match arg.as_str() {
                "--minimal" => parsed.minimal = true,
                "--multiple" => parsed.multiple = true,
                _ => match arg.split_once('=') {
                    Some((k, v)) => parsed.params.push((k.to_string(), v.to_string())),
                    None => return Err(cli_error(&format!("Error: Unknown field '{arg}'"))),
                },
            }
        }
        Ok(parsed)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, which the command requires.
    pub fn require(&self, key: &str) -> Result<&str, Failure> {
        self.get(key).ok_or_else(|| {
            cli_error(&format!(
                "Required parameter not found: {key}\nFor usage run: 'xe help'"
            ))
        })
    }

    /// `field=value` filters (everything but the listed control keys).
    pub fn filters(&self, control: &[&str]) -> Vec<(&str, &str)> {
        self.params
            .iter()
            .filter(|(k, _)| !control.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// `xe <class>-list [field=value…] [params=…] [--minimal]` over `records`
/// (`defaults`: the fields shown without `params=`; empty: all).
pub fn list(a: &Args, records: Vec<Record>, defaults: &[&str]) -> Outcome {
    let filters = a.filters(&["params"]);
    if let Some(first) = records.first() {
        if let Some((bad, _)) = filters
            .iter()
            .find(|(k, _)| !first.iter().any(|f| f.name == *k))
        {
            return Err(cli_error(&format!("Unknown field '{bad}'")));
        }
    }
    let matching: Vec<&Record> = records
        .iter()
        .filter(|r| {
            filters
                .iter()
                .all(|(k, v)| r.iter().any(|f| f.name == *k && f.value == *v))
        })
        .collect();
    let wanted: Option<Vec<&str>> = match a.get("params") {
        Some("all") => None,
        Some(list) => Some(list.split(',').collect()),
        None if defaults.is_empty() => None,
        None => Some(defaults.to_vec()),
    };
    let shown: Vec<Vec<&Field>> = matching
        .iter()
        .map(|r| {
            r.iter()
                .filter(|f| wanted.as_ref().is_none_or(|w| w.contains(&f.name)))
                .collect()
        })
        .collect();
    let text = if a.minimal {
        minimal(&shown)
    } else {
        human(&shown)
    };
    Ok((text, 0))
}

/// `xe <class>-param-get uuid=… param-name=…` over `records` (each
/// record's first field is its uuid; `class` names it in UUID_INVALID).
pub fn param_get(a: &Args, class: &str, records: Vec<Record>) -> Outcome {
    let uuid = a.require("uuid")?;
    let name = a.require("param-name")?;
    let record = records
        .iter()
        .find(|r| r.first().is_some_and(|f| f.value == uuid))
        .ok_or_else(|| api("UUID_INVALID", &[class.to_string(), uuid.to_string()]))?;
    let value = record
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| cli_error(&format!("Unknown field '{name}'")))?;
    Ok((format!("{}\n", value.value), 0))
}

/// The `n`-th uuid a simulated pool hands out (deterministic, version 4 shaped).
pub fn sim_uuid(n: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        n.wrapping_mul(2654435761) as u32,
        n & 0xffff,
        n & 0xfff,
        (n >> 12) & 0xfff,
        n
    )
}

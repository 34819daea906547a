//! How `xe` prints: records (`params=`), `--minimal` lists and errors, as
//! the fact sheet (`xapi-usb.md`) describes them.

/// One field of a record: name, access tag (`RO`, `RW`, `SRO`, `MRW`), value.
pub(super) struct Field {
    pub name: &'static str,
    pub access: &'static str,
    pub value: String,
}

pub(super) fn field(name: &'static str, access: &'static str, value: impl Into<String>) -> Field {
    Field {
        name,
        access,
        value: value.into(),
    }
}

/// A record's fields in record order.
pub(super) type Record = Vec<Field>;

/// Human output of records: per record its fields one a line (first label
/// padded right, later ones left, to 4 + the longest label), then two empty lines.
pub(super) fn human(records: &[Vec<&Field>]) -> String {
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
pub(super) fn minimal(records: &[Vec<&Field>]) -> String {
    let values: Vec<String> = records
        .iter()
        .filter_map(|r| r.first())
        .map(|f| f.value.replace('\\', "\\\\").replace(',', "\\,"))
        .collect();
    format!("{}\n", values.join(","))
}

/// A set value as xe prints it.
pub(super) fn set(items: &[String]) -> String {
    items.join("; ")
}

/// A map value as xe prints it.
pub(super) fn map(items: &std::collections::BTreeMap<String, String>) -> String {
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
pub(super) fn api_error(code: &str, params: &[String]) -> String {
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

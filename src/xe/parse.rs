//! Parsers for `xe` output, following the fact sheet's exact formats:
//! `--minimal` lists and the human record output that `params=` selects.

use std::collections::BTreeMap;

/// One record: field name → value (as printed).
pub type Record = BTreeMap<String, String>;

/// `--minimal` output: values joined by `,` with `\,` and `\\` escapes;
/// an empty line is an empty list.
pub fn minimal_list(output: &str) -> Vec<String> {
    let line = output.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        return Vec::new();
    }
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ',' => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    items.push(current);
    items
}

/// Human record output: each field `label (ACC): value` on one line (labels
/// padded), records separated by empty lines.
pub fn records(output: &str) -> Vec<Record> {
    let mut all = Vec::new();
    let mut current = Record::new();
    for line in output.lines() {
        match field_line(line) {
            Some((name, value)) => {
                current.insert(name, value);
            }
            None if line.trim().is_empty() => {
                if !current.is_empty() {
                    all.push(std::mem::take(&mut current));
                }
            }
            None => log::debug!("unparsed xe output line: {line:?}"),
        }
    }
    if !current.is_empty() {
        all.push(current);
    }
    all
}

/// Records read strictly, for output that decisions rest on: every record
/// holds exactly the `fields` asked for, each once, and a valid `uuid`; any
/// other line is an error. (A value with a line break, or text posing as a
/// field, cannot pass: it shows up as a stray line or a field twice.)
pub fn strict_records(output: &str, fields: &[&str]) -> Result<Vec<Record>, String> {
    let mut all = Vec::new();
    let mut current = Record::new();
    let mut finish = |current: &mut Record| -> Result<(), String> {
        if current.is_empty() {
            return Ok(());
        }
        let record = std::mem::take(current);
        if let Some(missing) = fields.iter().find(|f| !record.contains_key(**f)) {
            return Err(format!("a record lacks {missing}"));
        }
        if record.len() != fields.len() {
            return Err("a record holds fields that were not asked for".into());
        }
        match record.get("uuid") {
            Some(uuid) if super::looks_like_uuid(uuid) => {}
            _ => return Err("a record has no valid uuid".into()),
        }
        all.push(record);
        Ok(())
    };
    for line in output.lines() {
        if line.trim().is_empty() {
            finish(&mut current)?;
            continue;
        }
        let (name, value) = field_line(line).ok_or_else(|| format!("unexpected line {line:?}"))?;
        if current.insert(name.clone(), value).is_some() {
            return Err(format!("field {name} appears twice in a record"));
        }
    }
    finish(&mut current)?;
    Ok(all)
}

/// `   name ( RO): value` → (name, value).
fn field_line(line: &str) -> Option<(String, String)> {
    let close = line.find(')')?;
    let (label, rest) = line.split_at(close);
    let (name, access) = label.trim_start().rsplit_once(" (")?;
    if name.is_empty()
        || name.contains(' ')
        || !access.trim().chars().all(|c| c.is_ascii_uppercase())
    {
        return None;
    }
    let value = rest[1..].trim_start_matches(' ').strip_prefix(':')?;
    let value = value.strip_prefix(' ').unwrap_or(value);
    Some((name.to_string(), value.to_string()))
}

/// A set field (`a; b`) as a list.
pub fn set_items(value: &str) -> Vec<String> {
    if value.trim().is_empty() {
        Vec::new()
    } else {
        value.split("; ").map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_lists_unescape_commas_and_backslashes() {
        assert!(minimal_list("\n").is_empty());
        assert_eq!(minimal_list("a,b\n"), vec!["a", "b"]);
        assert_eq!(
            minimal_list("cam\\, front,x\\\\y\n"),
            vec!["cam, front", "x\\y"]
        );
    }

    #[test]
    fn parses_the_fact_sheet_example_and_keeps_odd_values() {
        let text = "uuid ( RO)           : cd7c086b-9216-1f42-f5fd-f6a9dbd967af\n     name-label ( RW): home: assistant (x)\n    power-state ( RO): running\n\n\nuuid ( RO)    : 2\n  empty ( RW): \n\n\n";
        let recs = records(text);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0]["uuid"], "cd7c086b-9216-1f42-f5fd-f6a9dbd967af");
        assert_eq!(recs[0]["name-label"], "home: assistant (x)");
        assert_eq!(recs[0]["power-state"], "running");
        assert_eq!(recs[1]["empty"], "");
    }

    #[test]
    fn strict_records_refuse_what_a_name_can_fake() {
        let u = "cd7c086b-9216-1f42-f5fd-f6a9dbd967af";
        let good = format!("uuid ( RO)    : {u}\n    power-state ( RO): running\n\n\n");
        assert_eq!(
            strict_records(&good, &["uuid", "power-state"])
                .unwrap()
                .len(),
            1
        );
        let twice = format!("uuid ( RO)    : {u}\n  name-label ( RW): x\nuuid ( RO): {u}\n\n\n");
        assert!(strict_records(&twice, &["uuid", "name-label"]).is_err());
        let stray = format!("uuid ( RO)    : {u}\n  name-label ( RW): x\nfrigate\n\n\n");
        assert!(strict_records(&stray, &["uuid", "name-label"]).is_err());
        assert!(strict_records("uuid ( RO): nope\n\n", &["uuid"]).is_err());
        assert!(strict_records("\n", &["uuid"]).unwrap().is_empty());
    }

    #[test]
    fn sets_split_on_semicolon_space() {
        assert_eq!(set_items("a; b"), vec!["a", "b"]);
        assert!(set_items("").is_empty());
    }
}

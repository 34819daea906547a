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
    fn sets_split_on_semicolon_space() {
        assert_eq!(set_items("a; b"), vec!["a", "b"]);
        assert!(set_items("").is_empty());
    }
}

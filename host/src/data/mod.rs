//! Edit requests from EasyEdit's JSON datasets (CounterFact flat, ZsRE, SafeEdit, ROME's known
//! facts) exactly as researchers have them, and from inline requests.

mod formats;
mod inline;
mod record;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use kedit_plugin_api::EditRequest;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

pub use formats::GENERALIZATION_INPUTS;
pub use inline::{flag_request, inline_request};
pub use record::Record;

#[derive(Deserialize, clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Counterfact,
    Zsre,
    Safeedit,
    Knowns,
    /// kedit's own request format, one JSON object per line (docs/requests.md).
    Jsonl,
    Auto,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Counterfact => "counterfact",
            DataFormat::Zsre => "zsre",
            DataFormat::Safeedit => "safeedit",
            DataFormat::Knowns => "knowns",
            DataFormat::Jsonl => "jsonl",
            DataFormat::Auto => "auto",
        }
    }
}

/// Which records of a file to use.
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    pub offset: usize,
    pub limit: Option<usize>,
}

/// Reads the requests of `path` in `format` (`Auto` detects it), records `offset..offset+limit`.
/// Only the selected records are checked; errors name the file, the record's index in the file
/// (0-based) and the field.
pub fn load_requests(path: &Path, format: DataFormat, window: Window) -> Result<Vec<EditRequest>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read data file {}", path.display()))?;
    let file = path.display().to_string();
    let jsonl = format == DataFormat::Jsonl
        || (format == DataFormat::Auto && path.extension().is_some_and(|e| e == "jsonl"));
    let records = if jsonl {
        split_lines(&file, &text)?
    } else {
        split_records(&file, &text)?
    };
    if window.offset > records.len() || (window.offset == records.len() && !records.is_empty()) {
        bail!(
            "{file}: --offset {} is past the end of the file ({} records)",
            window.offset,
            records.len()
        );
    }
    let format = match format {
        DataFormat::Auto if jsonl => DataFormat::Jsonl,
        DataFormat::Auto => detect_format(&file, records.first().copied())?,
        explicit => explicit,
    };
    tracing::info!(
        "{file}: {} records, format {}",
        records.len(),
        format.name()
    );
    let limit = window.limit.unwrap_or(usize::MAX);
    records
        .iter()
        .enumerate()
        .skip(window.offset)
        .take(limit)
        .map(|(index, raw)| {
            let value: Value = serde_json::from_str(raw.get())
                .with_context(|| format!("{file}: record {index}: invalid JSON"))?;
            let record = Record::new(&file, index, &value)?;
            let mut request = match format {
                DataFormat::Counterfact => formats::counterfact(&record, index),
                DataFormat::Zsre => formats::zsre(&record, index),
                DataFormat::Safeedit => formats::safeedit(&record, index),
                DataFormat::Knowns => formats::knowns(&record, index),
                DataFormat::Jsonl => formats::jsonl(&record, index),
                DataFormat::Auto => unreachable!("auto-detection resolved the format above"),
            }?;
            request.source_json = raw.get().into();
            Ok(request)
        })
        .collect()
}

/// The file's records, each as its original JSON text.
fn split_records<'a>(file: &str, text: &'a str) -> Result<Vec<&'a RawValue>> {
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(records) => Ok(records),
        Err(array_error) => match serde_json::from_str::<Value>(text) {
            Err(e) => Err(anyhow!("{file}: invalid JSON: {e}")),
            Ok(other) if !other.is_array() => Err(anyhow!(
                "{file}: expected a JSON array of records, found {}",
                record::describe(&other)
            )),
            Ok(_) => Err(anyhow!("{file}: {array_error}")),
        },
    }
}

/// JSONL: record N is line N+1; blank lines are allowed only at the end of the file.
fn split_lines<'a>(file: &str, text: &'a str) -> Result<Vec<&'a RawValue>> {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if line.trim().is_empty() {
                bail!("{file}: line {}: empty line inside a JSONL file", i + 1);
            }
            serde_json::from_str::<&RawValue>(line)
                .map_err(|e| anyhow!("{file}: record {i} (line {}): invalid JSON: {e}", i + 1))
        })
        .collect()
}

/// Tells the format from the keys of the first record.
pub fn detect_format(file: &str, first: Option<&RawValue>) -> Result<DataFormat> {
    let Some(first) = first else {
        bail!("{file}: the file has no records");
    };
    let value: Value = serde_json::from_str(first.get())?;
    let Value::Object(fields) = &value else {
        bail!(
            "{file}: record 0: expected an object, found {}",
            record::describe(&value)
        );
    };
    let has = |k: &str| fields.contains_key(k);
    let format = if has("adversarial prompt") {
        DataFormat::Safeedit
    } else if has("src") && has("alt") {
        DataFormat::Zsre
    } else if has("known_id") || (has("attribute") && has("template")) {
        DataFormat::Knowns
    } else if has("prompt") && has("target_new") {
        DataFormat::Counterfact
    } else {
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        bail!(
            "{file}: cannot tell the dataset format from the keys of record 0 ({}); pass \
             --format counterfact|zsre|safeedit|knowns",
            keys.join(", ")
        );
    };
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_wrong_type_names_file_record_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "cf.json",
            r#"[{"prompt": "A is in", "subject": "A", "target_new": "B"},
                {"prompt": "C is in", "subject": "C", "target_new": null}]"#,
        );
        let e = load_requests(&p, DataFormat::Counterfact, Window::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("cf.json: record 1: field `target_new`: expected a string, found null"),
            "{e}"
        );
    }

    #[test]
    fn window_selects_records_and_keeps_their_original_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "cf.json",
            r#"[{"prompt": "A is in", "subject": "A", "target_new": "B"},
                {"case_id": 7,  "prompt": "C is in", "subject": "C", "target_new": "D"},
                {"prompt": "E is in", "subject": "E", "target_new": null}]"#,
        );
        let window = Window {
            offset: 1,
            limit: Some(1),
        };
        let requests = load_requests(&p, DataFormat::Auto, window).unwrap();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].id.as_str(), "7");
        assert_eq!(
            requests[0].source_json.as_str(),
            r#"{"case_id": 7,  "prompt": "C is in", "subject": "C", "target_new": "D"}"#
        );
        let e = load_requests(
            &p,
            DataFormat::Auto,
            Window {
                offset: 3,
                limit: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("past the end"), "{e}");
    }

    #[test]
    fn a_subject_missing_from_its_prompt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "cf.json",
            r#"[{"prompt": "A is in", "subject": "Z", "target_new": "B"}]"#,
        );
        let e = load_requests(&p, DataFormat::Counterfact, Window::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("record 0: field `subject`"), "{e}");
    }

    #[test]
    fn unknown_shapes_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "x.json", r#"{"a": 1}"#);
        let e = load_requests(&p, DataFormat::Auto, Window::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected a JSON array of records, found an object"),
            "{e}"
        );
        let p = write(&dir, "y.json", r#"[{"question": "q"}]"#);
        let e = load_requests(&p, DataFormat::Auto, Window::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot tell the dataset format"), "{e}");
        assert!(e.contains("question"), "{e}");
        let p = write(&dir, "z.json", "[{\"prompt\": ");
        let e = load_requests(&p, DataFormat::Auto, Window::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("z.json: invalid JSON"), "{e}");
    }
}

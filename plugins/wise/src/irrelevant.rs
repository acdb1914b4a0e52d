//! WISE's irrelevant inputs `x_i` for the routing loss, from a file (EasyEdit's `loc_prompts`).
//!
//! EasyEdit's drivers pass `loc + " " + loc_ans` of ZsRE *train* records, so the memory learns
//! to stay quiet on questions that are not the ones locality is measured on. Without such a file
//! kedit takes the request's own locality prompt, which is the very input Loc scores: convenient,
//! but it trains on the evaluation's locality prompts (docs/wise.md, "Irrelevant inputs").

use std::path::Path;

use kedit_plugin_api::PluginError;
use serde_json::Value;

/// The texts of `path`: a JSON array of strings, a JSON array of ZsRE-style records (`loc` and
/// optional `loc_ans`, joined by a space, as EasyEdit's driver does), or plain text with one
/// input per non-empty line.
pub fn load(path: &Path) -> Result<Vec<String>, PluginError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PluginError::invalid(format!(
            "wise: cannot read `irrelevant_prompts` file {}: {e}",
            path.display()
        ))
    })?;
    let bad = |msg: String| PluginError::invalid(format!("wise: {}: {msg}", path.display()));
    let prompts: Vec<String> = if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a JSON array of prompts or records: {e}")))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Object(o) => {
                    let loc = o
                        .get("loc")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("record {i}: no string field `loc`")))?;
                    match o.get("loc_ans") {
                        None | Some(Value::Null) => Ok(loc.to_string()),
                        Some(Value::String(a)) if a.is_empty() => Ok(loc.to_string()),
                        Some(Value::String(a)) => Ok(format!("{loc} {a}")),
                        Some(other) => Err(bad(format!(
                            "record {i}: field `loc_ans` is {other}, not a string"
                        ))),
                    }
                }
                other => Err(bad(format!(
                    "record {i} is {other}, neither a string nor a record with `loc`"
                ))),
            })
            .collect::<Result<_, _>>()?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
        return Err(bad(format!("entry {i} is empty")));
    }
    if prompts.is_empty() {
        return Err(bad("no irrelevant prompts in the file".into()));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn strings_records_and_lines_are_read() {
        let (_d, p) = write(r#"["who wrote it?", "where is it"]"#);
        assert_eq!(load(&p).unwrap(), ["who wrote it?", "where is it"]);
        let (_d, p) = write(
            r#"[{"loc": "nq question: who sang", "loc_ans": "Abba", "src": "x"}, {"loc": "q2"}]"#,
        );
        assert_eq!(load(&p).unwrap(), ["nq question: who sang Abba", "q2"]);
        let (_d, p) = write("first line\n\n second\n");
        assert_eq!(load(&p).unwrap(), ["first line", " second"]);
    }

    #[test]
    fn bad_records_name_the_file_and_the_record() {
        let (_d, p) = write(r#"[{"loc": "a"}, {"src": "b"}]"#);
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("record 1") && e.contains("`loc`") && e.contains(&p.display().to_string()),
            "{e}"
        );
        let (_d, p) = write(r#"[{"loc": "a", "loc_ans": 3}]"#);
        assert!(load(&p).unwrap_err().to_string().contains("`loc_ans` is 3"));
        let (_d, p) = write("\n\n");
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("no irrelevant prompts"));
        let missing = std::path::Path::new("/nonexistent/irrelevant.json");
        assert!(load(missing)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/irrelevant.json"));
    }
}

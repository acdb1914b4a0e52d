//! Typed access to one JSON record, with errors that say exactly where a dataset is broken:
//! "counterfact-val.json: record 17: field `target_new`: expected a string, found null".

use std::fmt::Display;

use anyhow::{anyhow, Result};
use serde_json::{Map, Value};

pub struct Record<'a> {
    file: &'a str,
    index: usize,
    /// Path of this object inside the record (`knowledge constrain.`), empty at the top.
    prefix: String,
    fields: &'a Map<String, Value>,
}

/// "null", "a number", ... for "expected X, found Y".
pub fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Record<'a> {
    pub fn new(file: &'a str, index: usize, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(fields) => Ok(Self {
                file,
                index,
                prefix: String::new(),
                fields,
            }),
            other => Err(anyhow!(
                "{file}: record {index}: expected an object, found {}",
                describe(other)
            )),
        }
    }

    pub fn has(&self, field: &str) -> bool {
        self.fields.contains_key(field)
    }

    /// An error about `field` of this record.
    pub fn error(&self, field: &str, problem: impl Display) -> anyhow::Error {
        anyhow!(
            "{}: record {}: field `{}{}`: {}",
            self.file,
            self.index,
            self.prefix,
            field,
            problem
        )
    }

    fn expected(&self, field: &str, what: &str, found: &Value) -> anyhow::Error {
        self.error(field, format!("expected {what}, found {}", describe(found)))
    }

    /// A required string.
    pub fn string(&self, field: &str) -> Result<String> {
        match self.fields.get(field) {
            None => Err(self.error(field, "missing")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.expected(field, "a string", other)),
        }
    }

    /// A string that may be missing or null.
    pub fn optional_string(&self, field: &str) -> Result<Option<String>> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.expected(field, "a string", other)),
        }
    }

    /// A string or a list of strings; missing or null is empty.
    pub fn strings(&self, field: &str) -> Result<Vec<String>> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.error(
                        &format!("{field}[{i}]"),
                        format!("expected a string, found {}", describe(other)),
                    )),
                })
                .collect(),
            Some(other) => Err(self.expected(field, "a string or a list of strings", other)),
        }
    }

    /// A record id: a number or a string, if present.
    pub fn id(&self, field: &str) -> Result<Option<String>> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(self.expected(field, "a number or a string", other)),
        }
    }

    /// A nested object, if present.
    pub fn object(&self, field: &str) -> Result<Option<Record<'a>>> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(fields)) => Ok(Some(Record {
                file: self.file,
                index: self.index,
                prefix: format!("{}{field}.", self.prefix),
                fields,
            })),
            Some(other) => Err(self.expected(field, "an object", other)),
        }
    }

    /// Checks the EditRequest contract that a non-empty subject occurs in its prompt.
    pub fn check_subject_in_prompt(
        &self,
        subject_field: &str,
        subject: &str,
        prompt: &str,
    ) -> Result<()> {
        if subject.is_empty() || prompt.contains(subject) {
            Ok(())
        } else {
            Err(self.error(
                subject_field,
                format!("{subject:?} does not occur in the prompt {prompt:?}"),
            ))
        }
    }

    /// Pairs two parallel string lists (prompts and their answers).
    pub fn paired(
        &self,
        prompts_field: &str,
        answers_field: &str,
    ) -> Result<Vec<(String, String)>> {
        let prompts = self.strings(prompts_field)?;
        let answers = self.strings(answers_field)?;
        if prompts.len() != answers.len() {
            return Err(self.error(
                answers_field,
                format!(
                    "has {} entries but `{}{prompts_field}` has {}",
                    answers.len(),
                    self.prefix,
                    prompts.len()
                ),
            ));
        }
        Ok(prompts.into_iter().zip(answers).collect())
    }

    /// Rejects keys outside `allowed`, naming the first unknown one and listing the allowed.
    pub fn check_keys(&self, allowed: &[&str]) -> Result<()> {
        match self.fields.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(key) => Err(self.error(
                key,
                format!("unknown field; allowed: {}", allowed.join(", ")),
            )),
        }
    }

    /// An optional array of objects (`[]` when absent).
    pub fn objects(&self, field: &str) -> Result<Vec<Record<'a>>> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(fields) => Ok(Record {
                        file: self.file,
                        index: self.index,
                        prefix: format!("{}{field}[{i}].", self.prefix),
                        fields,
                    }),
                    other => Err(self.expected(&format!("{field}[{i}]"), "an object", other)),
                })
                .collect(),
            Some(other) => Err(self.expected(field, "an array of objects", other)),
        }
    }
}

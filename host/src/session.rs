//! An edit session: requests applied one edit call at a time (or all in one call with `batch`),
//! cumulatively on one model. Every call is a transaction — on an error (a plugin panic
//! included), non-finite logits, or Ctrl-C the model is rolled back to the journal mark taken
//! before the call, the failure is reported, and the session goes on with the next request.
//! After Ctrl-C the remaining requests are skipped (the user asked to stop).

use std::io::Write;
use std::time::Instant;

use anyhow::{anyhow, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kedit_plugin_api::{EditReport, EditRequest, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::cancel::CancelFlag;
use crate::editor::{EditProgress, EditorHandle};
use crate::model::ModelHandle;
use crate::plugins::plugin_error_kind;

#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// All requests in one edit call.
    pub batch: bool,
    /// Tokens of greedy continuation shown before and after each edit; 0 shows none.
    pub probe_tokens: usize,
    /// Show an indicatif bar on stderr (only drawn on a terminal).
    pub progress_bar: bool,
    /// Keep each applied edit's undo entries in the model's journal, so that the caller can
    /// roll back to a mark taken before the session. Without it every applied edit is
    /// committed (its undo entries forgotten, the edit kept): memory stays bounded over
    /// thousands of sequential edits, each of which would otherwise keep the weights or side
    /// memories it replaced. A failed edit is rolled back either way.
    pub keep_undo: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            batch: false,
            probe_tokens: 8,
            progress_bar: true,
            keep_undo: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Applied,
    /// The edit call failed or left the model broken; the model was rolled back.
    Failed,
    /// Ctrl-C during the call; the model was rolled back.
    Cancelled,
    /// Not attempted (Ctrl-C earlier, or the model could not be restored after a failure).
    Skipped,
}

impl Status {
    /// The name records use (`applied`, `failed`, …).
    pub fn name(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
        }
    }
}

/// A greedy continuation shown to the user.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// `prompt`, `rephrase`, `locality`, `portability`.
    pub kind: &'static str,
    /// Index of the request in the session.
    pub request: usize,
    pub prompt: String,
    /// The answer the dataset expects (target for the prompt, the old answer for locality).
    pub expected: Option<String>,
    pub output: String,
}

/// The editor's report, with its details parsed when they are JSON.
#[derive(Clone, Debug, Serialize)]
pub struct ReportRecord {
    pub method: String,
    pub requests: u32,
    pub details: Value,
}

impl From<&EditReport> for ReportRecord {
    fn from(r: &EditReport) -> Self {
        Self {
            method: r.method.to_string(),
            requests: r.requests,
            details: serde_json::from_str(&r.details_json)
                .unwrap_or_else(|_| Value::String(r.details_json.to_string())),
        }
    }
}

/// One edit call (one request, or all of them in batch mode).
#[derive(Clone, Debug, Serialize)]
pub struct EditOutcome {
    /// Indices of the requests this call carried.
    pub requests: Vec<usize>,
    pub status: Status,
    pub error: Option<String>,
    /// The journal mark taken before the call: rolling back to it undoes this edit and every
    /// later one (with [`SessionOptions::keep_undo`]; without it the applied edit is committed).
    pub journal_mark: Option<u64>,
    pub report: Option<ReportRecord>,
    pub before: Vec<Prediction>,
    pub after: Vec<Prediction>,
    pub edit_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionSummary {
    pub outcomes: Vec<EditOutcome>,
    pub seconds: f64,
    /// The model could not be rolled back after a failure: its state is unknown.
    pub model_broken: bool,
}

impl SessionSummary {
    pub fn count(&self, status: Status) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status == status)
            .map(|o| o.requests.len())
            .sum()
    }

    pub fn all_applied(&self) -> bool {
        !self.model_broken && self.outcomes.iter().all(|o| o.status == Status::Applied)
    }
}

pub struct EditSession<'a> {
    pub model: &'a mut ModelHandle,
    pub editor: &'a mut EditorHandle,
    pub method: String,
    pub hparams_json: String,
    pub cancel: CancelFlag,
    pub options: SessionOptions,
}

/// How a transaction ended.
enum Transaction {
    Applied {
        mark: u64,
        report: EditReport,
    },
    RolledBack {
        mark: u64,
        error: anyhow::Error,
        cancelled: bool,
    },
    /// The failure could not be undone.
    Broken {
        error: anyhow::Error,
    },
}

impl EditSession<'_> {
    /// Applies `requests`, writing a human-readable account to `out`.
    pub fn run(&mut self, requests: &[EditRequest], out: &mut dyn Write) -> Result<SessionSummary> {
        let started = Instant::now();
        let groups: Vec<Vec<usize>> = if self.options.batch {
            vec![(0..requests.len()).collect()]
        } else {
            (0..requests.len()).map(|i| vec![i]).collect()
        };
        let bar = self.progress_bar(groups.len());
        let mut summary = SessionSummary::default();
        for (g, group) in groups.iter().enumerate() {
            if self.cancel.is_requested() || summary.model_broken {
                summary.outcomes.push(skipped(group));
                continue;
            }
            let (outcome, restored) =
                self.edit_group(g, groups.len(), group, requests, bar.as_ref(), out)?;
            if let Some(bar) = &bar {
                bar.inc(1);
            }
            summary.model_broken |= !restored;
            summary.outcomes.push(outcome);
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        summary.seconds = started.elapsed().as_secs_f64();
        self.print_summary(&summary, out)?;
        Ok(summary)
    }

    /// A bar over the edit calls, or for a single call a spinner that shows the editor's own
    /// progress messages (indicatif draws neither when stderr is not a terminal).
    fn progress_bar(&self, groups: usize) -> Option<ProgressBar> {
        if !self.options.progress_bar {
            return None;
        }
        let (bar, template) = if groups >= 2 {
            (
                ProgressBar::new(groups as u64),
                "{bar:30} {pos}/{len} edits {elapsed} {wide_msg}",
            )
        } else {
            (
                ProgressBar::new_spinner(),
                "{spinner} editing {elapsed} {wide_msg}",
            )
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        Some(bar)
    }

    fn edit_group(
        &mut self,
        g: usize,
        groups: usize,
        group: &[usize],
        requests: &[EditRequest],
        bar: Option<&ProgressBar>,
        out: &mut dyn Write,
    ) -> Result<(EditOutcome, bool)> {
        let print = |out: &mut dyn Write, text: String| -> Result<()> {
            match bar {
                Some(bar) => bar.suspend(|| writeln!(out, "{text}")),
                None => writeln!(out, "{text}"),
            }?;
            Ok(())
        };
        if let Some(bar) = bar {
            bar.set_message("");
        }
        for &i in group {
            print(out, heading(g, groups, i, &requests[i], group.len() > 1))?;
        }
        let before = self.predictions(group, requests);
        print(out, format_predictions("before", &before))?;

        let batch: Vec<EditRequest> = group.iter().map(|&i| requests[i].clone()).collect();
        let edit_started = Instant::now();
        let transaction = self.transaction(&batch, bar);
        let edit_seconds = edit_started.elapsed().as_secs_f64();

        let mut outcome = EditOutcome {
            requests: group.to_vec(),
            status: Status::Applied,
            error: None,
            journal_mark: None,
            report: None,
            before,
            after: Vec::new(),
            edit_seconds,
        };
        match transaction {
            Transaction::Applied { mark, report } => {
                outcome.journal_mark = Some(mark);
                if !self.options.keep_undo {
                    self.model
                        .journal_commit(mark)
                        .context("cannot commit the applied edit in the model's journal")?;
                }
                print(
                    out,
                    format!(
                        "  edit    ok in {edit_seconds:.2} s: {}",
                        report_summary(&report)
                    ),
                )?;
                outcome.report = Some(ReportRecord::from(&report));
                outcome.after = self.predictions(group, requests);
                print(out, format_predictions("after", &outcome.after))?;
            }
            Transaction::RolledBack {
                mark,
                error,
                cancelled,
            } => {
                outcome.journal_mark = Some(mark);
                outcome.status = if cancelled {
                    Status::Cancelled
                } else {
                    Status::Failed
                };
                let what = if cancelled { "cancelled" } else { "FAILED" };
                let message = format!("{error:#}");
                print(
                    out,
                    format!("  edit    {what}, model rolled back: {message}"),
                )?;
                eprintln!(
                    "error: {} {}: {message} (model rolled back)",
                    request_word(group),
                    ids(group, requests)
                );
                outcome.error = Some(message);
            }
            Transaction::Broken { error } => {
                outcome.status = Status::Failed;
                let message = format!("{error:#}");
                print(
                    out,
                    format!("  edit    FAILED and the model could not be restored: {message}"),
                )?;
                eprintln!("error: {message}; the model's state is unknown, stopping");
                outcome.error = Some(message);
                return Ok((outcome, false));
            }
        }
        Ok((outcome, true))
    }

    /// One edit call under a journal mark.
    fn transaction(&mut self, batch: &[EditRequest], bar: Option<&ProgressBar>) -> Transaction {
        let mark = match self.model.journal_mark() {
            Ok(mark) => mark,
            Err(error) => {
                return Transaction::Broken {
                    error: error.context("cannot take a journal mark before the edit"),
                }
            }
        };
        let mut progress = EditProgress::new(&self.cancel, bar);
        let result = self.editor.edit(
            self.model,
            &self.method,
            batch,
            &self.hparams_json,
            &mut progress,
        );
        let error = match result {
            Err(error) => error,
            Ok(report) => match self.check_after_edit(batch) {
                None => return Transaction::Applied { mark, report },
                Some(error) => error,
            },
        };
        let cancelled =
            self.cancel.is_requested() || plugin_error_kind(&error) == Some(ErrorKind::Cancelled);
        // A rollback that "succeeds" but leaves the journal elsewhere is no rollback either.
        let restored = self
            .model
            .journal_rollback(mark)
            .and_then(|()| self.model.journal_mark())
            .and_then(|now| match now == mark {
                true => Ok(()),
                false => Err(anyhow!(
                    "the journal is at {now} after rolling back to {mark}"
                )),
            });
        match restored {
            Ok(()) => Transaction::RolledBack {
                mark,
                error,
                cancelled,
            },
            Err(rollback_error) => Transaction::Broken {
                error: anyhow!("{error:#}; rolling back failed too: {rollback_error:#}"),
            },
        }
    }

    /// Why a successful edit call must still be undone, if it must.
    fn check_after_edit(&self, batch: &[EditRequest]) -> Option<anyhow::Error> {
        if self.cancel.is_requested() {
            return Some(anyhow!("interrupted by Ctrl-C"));
        }
        let prompts: Vec<&str> = batch.iter().map(|r| r.prompt.as_str()).collect();
        match self.model.logits_finite(&prompts) {
            Ok(true) => None,
            Ok(false) => Some(anyhow!(
                "the edit made the model's logits non-finite (NaN or infinity) on the edited prompt"
            )),
            Err(e) => Some(e.context("cannot check the edited model's logits")),
        }
    }

    fn predictions(&self, group: &[usize], requests: &[EditRequest]) -> Vec<Prediction> {
        if self.options.probe_tokens == 0 {
            return Vec::new();
        }
        let mut predictions = Vec::new();
        for &i in group {
            let r = &requests[i];
            let mut probe = |kind, prompt: &str, expected: Option<&str>| {
                let output = self
                    .model
                    .greedy_text(prompt, self.options.probe_tokens)
                    .unwrap_or_else(|e| format!("<error: {e:#}>"));
                predictions.push(Prediction {
                    kind,
                    request: i,
                    prompt: prompt.to_string(),
                    expected: expected.map(str::to_string),
                    output,
                });
            };
            probe("prompt", r.prompt.as_str(), Some(r.target_new.as_str()));
            for p in r.rephrase.iter() {
                probe("rephrase", p.as_str(), Some(r.target_new.as_str()));
            }
            for l in r.locality.iter() {
                probe("locality", l.prompt.as_str(), Some(l.answer.as_str()));
            }
            for p in r.portability.iter() {
                probe("portability", p.prompt.as_str(), Some(p.answer.as_str()));
            }
        }
        predictions
    }

    fn print_summary(&self, summary: &SessionSummary, out: &mut dyn Write) -> Result<()> {
        let total: usize = summary.outcomes.iter().map(|o| o.requests.len()).sum();
        let mut parts = vec![format!("{} applied", summary.count(Status::Applied))];
        for (status, word) in [
            (Status::Failed, "failed (rolled back)"),
            (Status::Cancelled, "cancelled (rolled back)"),
            (Status::Skipped, "skipped"),
        ] {
            let n = summary.count(status);
            if n > 0 {
                parts.push(format!("{n} {word}"));
            }
        }
        writeln!(
            out,
            "{total} request(s) in {:.1} s: {}",
            summary.seconds,
            parts.join(", ")
        )?;
        Ok(())
    }
}

fn skipped(group: &[usize]) -> EditOutcome {
    EditOutcome {
        requests: group.to_vec(),
        status: Status::Skipped,
        error: None,
        journal_mark: None,
        report: None,
        before: Vec::new(),
        after: Vec::new(),
        edit_seconds: 0.0,
    }
}

fn request_word(group: &[usize]) -> &'static str {
    if group.len() == 1 {
        "request"
    } else {
        "batch of requests"
    }
}

fn ids(group: &[usize], requests: &[EditRequest]) -> String {
    group
        .iter()
        .map(|&i| requests[i].id.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn heading(g: usize, groups: usize, i: usize, r: &EditRequest, in_batch: bool) -> String {
    let counter = if in_batch {
        format!("[batch {}]", i + 1)
    } else {
        format!("[{}/{groups}]", g + 1)
    };
    let was = r
        .ground_truth
        .as_ref()
        .into_option()
        .map(|g| format!(" (was {})", quote(g.as_str(), 40)))
        .unwrap_or_default();
    format!(
        "{counter} request {}: {} -> {}{was}",
        r.id,
        quote(r.prompt.as_str(), 60),
        quote(r.target_new.as_str(), 40)
    )
}

fn format_predictions(label: &str, predictions: &[Prediction]) -> String {
    let mut lines = Vec::new();
    for (n, p) in predictions.iter().enumerate() {
        let head = if n == 0 { label } else { "" };
        let expected = match (p.kind, &p.expected) {
            ("locality", Some(e)) => format!("  (answer {})", quote(e, 30)),
            _ => String::new(),
        };
        lines.push(format!(
            "  {head:<7} {:<11} {} => {}{expected}",
            p.kind,
            quote(&p.prompt, 50),
            quote(&p.output, 60)
        ));
    }
    lines.join("\n")
}

/// The report's method, request count and top-level scalar details.
pub fn report_summary(report: &EditReport) -> String {
    let mut text = format!("{}, {} request(s)", report.method, report.requests);
    match serde_json::from_str::<Value>(&report.details_json) {
        Ok(Value::Object(details)) => {
            let items: Vec<String> = details
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::Number(n) => Some(format!("{k}={}", short_number(n))),
                    Value::Bool(b) => Some(format!("{k}={b}")),
                    Value::String(s) if s.len() <= 40 => Some(format!("{k}={s}")),
                    Value::Array(a) => summarize_array(k, a),
                    _ => None,
                })
                .take(8)
                .collect();
            if !items.is_empty() {
                text.push_str("; ");
                text.push_str(&items.join(" "));
            }
        }
        _ if !report.details_json.is_empty() => {
            text.push_str("; ");
            text.push_str(&quote(&report.details_json, 80));
        }
        _ => {}
    }
    text
}

/// Short scalar lists inline; lists of step records as their count and final loss; nested
/// lists (token ids) not at all.
fn summarize_array(key: &str, items: &[Value]) -> Option<String> {
    let scalar = |v: &Value| matches!(v, Value::Number(_) | Value::Bool(_) | Value::String(_));
    if items.iter().all(scalar) {
        if items.len() <= 4 {
            let shown: Vec<String> = items
                .iter()
                .map(|v| match v {
                    Value::Number(n) => short_number(n),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            return Some(format!("{key}=[{}]", shown.join(", ")));
        }
        return Some(format!("{key}=[{} values]", items.len()));
    }
    if items.iter().all(Value::is_object) {
        let final_loss = items
            .last()
            .and_then(|last| last.get("loss"))
            .and_then(Value::as_f64)
            .map(|loss| format!(" (final loss {loss:.4})"))
            .unwrap_or_default();
        return Some(format!("{key}: {}{final_loss}", items.len()));
    }
    None
}

fn short_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() => format!("{f:.4}"),
        _ => n.to_string(),
    }
}

/// `text` quoted on one line (Debug escapes newlines), cut to `max` characters.
fn quote(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        format!("{text:?}")
    } else {
        let kept: String = text.chars().take(max).collect();
        format!("{kept:?}…")
    }
}

//! The evaluation protocols of ../shared/METHODS.md §1.5–1.6, on top of the transactional
//! [`EditSession`] (every edit call runs under a journal mark and is rolled back on failure):
//!
//! * `single`: each request edits the original model, is evaluated, and is undone (rollback to
//!   the journal mark taken before its edit) — EasyEdit's default.
//! * `sequential`: the edits accumulate; every request is evaluated on the **final** model after
//!   the T-th edit (the WISE paper's protocol, EasyEdit before `3c21b20`). `eval_each`
//!   additionally evaluates each request right after its own edit (EasyEdit since `3c21b20`).
//!   Applied edits are committed as they come (no undo history, so memory stays bounded over
//!   thousands of edits): the model is left carrying them.
//! * `batch`: `batch_size` requests per edit call, evaluated, then undone.
//!
//! A request whose edit failed (and was rolled back by the session) is still evaluated on the
//! model as it is: a failed edit counts as an edit that changed nothing.

use std::io::{self, IsTerminal};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kedit_plugin_api::EditRequest;
use serde::{Deserialize, Serialize};

use super::heldout::HeldOut;
use super::score::{score_request, RecordScore, ScoreSettings};
use crate::cancel::CancelFlag;
use crate::editor::EditorHandle;
use crate::model::ModelHandle;
use crate::session::{EditSession, SessionOptions, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Single,
    Sequential,
    Batch,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Single => "single",
            Protocol::Sequential => "sequential",
            Protocol::Batch => "batch",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProtocolOptions {
    pub protocol: Protocol,
    /// Requests per edit call (1 for `single`).
    pub batch_size: usize,
    /// Sequential only: also evaluate each request right after its own edit.
    pub eval_each: bool,
}

/// One request's outcome and numbers.
#[derive(Clone, Debug, Serialize)]
pub struct RequestResult {
    /// Index in the evaluated slice.
    pub index: usize,
    pub id: String,
    /// Which edit call carried it (0-based).
    pub edit_call: usize,
    pub status: Status,
    pub error: Option<String>,
    /// Seconds of the edit call that carried this request (shared by a batch).
    pub edit_seconds: f64,
    /// Seconds spent evaluating this request after the edit(s).
    pub eval_seconds: f64,
    pub post: Option<RecordScore>,
    /// Sequential with `eval_each`: the evaluation right after this request's own edit.
    pub immediate: Option<RecordScore>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    pub results: Vec<RequestResult>,
    /// Seconds of each edit call.
    pub edit_calls: Vec<f64>,
    pub eval_seconds: f64,
    pub seconds: f64,
    pub model_broken: bool,
    pub cancelled: bool,
    /// The held-out corpus perplexity before the first edit and after the last (sequential
    /// protocol with a perplexity corpus).
    pub perplexity: Option<PerplexityChange>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityChange {
    pub held_out: HeldOut,
    pub pre: f64,
    /// None when the run stopped before its final evaluation (cancelled, or the model broke).
    pub post: Option<f64>,
    pub seconds: f64,
}

/// The editor and how to call it.
pub struct EditContext<'a> {
    pub editor: &'a mut EditorHandle,
    pub method: String,
    pub hparams_json: String,
    pub cancel: CancelFlag,
}

/// A progress line for logs: indicatif draws nothing when stderr is not a terminal (a run under
/// `nohup` or in CI), and a long evaluation should still say how far it is.
pub(crate) fn log_progress(show: bool, line: impl FnOnce() -> String) {
    if show && !io::stderr().is_terminal() {
        eprintln!("{}", line());
    }
}

pub(crate) fn bar(len: u64, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} {bar:30} {pos}/{len} {elapsed_precise} ETA {eta_precise} {wide_msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Scores every request on the unedited model, with a progress bar.
pub fn evaluate_all(
    model: &ModelHandle,
    requests: &[EditRequest],
    settings: &ScoreSettings,
    pre: Option<&[RecordScore]>,
    label: &str,
    show_progress: bool,
) -> Result<Vec<RecordScore>> {
    let bar = bar(requests.len() as u64, show_progress);
    bar.set_prefix(label.to_string());
    let mut out = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let pre_loc = pre.map(|p| p[i].locality_argmax.as_slice());
        out.push(score_request(model, r, i, settings, pre_loc)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// A corpus perplexity after the last edit needs edits that accumulate.
pub fn check_held_out(protocol: Protocol) -> Result<()> {
    if protocol != Protocol::Sequential {
        bail!(
            "a perplexity corpus (--ppl-corpus) needs the sequential protocol (--protocol \
             sequential): under `{}` every edit is undone before the next, so there is no edited \
             model to measure",
            protocol.name()
        );
    }
    Ok(())
}

/// Runs `options.protocol` over `requests`; `pre` is the pre-edit baseline (one per request);
/// `held_out`, if given, is measured before the first edit and after the last (sequential only).
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &mut ModelHandle,
    edit: &mut EditContext<'_>,
    requests: &[EditRequest],
    pre: &[RecordScore],
    settings: &ScoreSettings,
    options: &ProtocolOptions,
    held_out: Option<&HeldOut>,
    show_progress: bool,
) -> Result<RunResult> {
    let started = Instant::now();
    if held_out.is_some() {
        check_held_out(options.protocol)?;
    }
    let size = match options.protocol {
        Protocol::Single => 1,
        _ => options.batch_size.max(1),
    };
    let groups: Vec<Vec<usize>> = (0..requests.len())
        .collect::<Vec<_>>()
        .chunks(size)
        .map(<[usize]>::to_vec)
        .collect();
    let sequential = options.protocol == Protocol::Sequential;
    let final_evals = if sequential { requests.len() } else { 0 };
    let bar = bar((groups.len() + final_evals) as u64, show_progress);
    bar.set_prefix(options.protocol.name());
    let mut run = RunResult::default();
    if let Some(h) = held_out {
        let t = Instant::now();
        let pre = h.perplexity(model).context("pre-edit corpus perplexity")?;
        run.perplexity = Some(PerplexityChange {
            held_out: h.clone(),
            pre,
            post: None,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    for (g, group) in groups.iter().enumerate() {
        if edit.cancel.is_requested() || run.model_broken {
            run.cancelled |= edit.cancel.is_requested();
            for &i in group {
                run.results.push(skipped(i, g, &requests[i]));
            }
            bar.inc(1);
            continue;
        }
        bar.set_message(format!("editing request {}", requests[group[0]].id));
        let mark = model.journal_mark()?;
        let batch: Vec<EditRequest> = group.iter().map(|&i| requests[i].clone()).collect();
        let summary = {
            let mut session = EditSession {
                model,
                editor: edit.editor,
                method: edit.method.clone(),
                hparams_json: edit.hparams_json.clone(),
                cancel: edit.cancel.clone(),
                options: SessionOptions {
                    batch: group.len() > 1,
                    probe_tokens: 0,
                    progress_bar: false,
                    // Sequential edits accumulate for good: keeping every replaced weight or
                    // side memory for an undo nobody asks for grows without bound (1,000 WISE
                    // edits on SmolLM2 filled 24 GB).
                    keep_undo: !sequential,
                },
            };
            session.run(&batch, &mut io::sink())?
        };
        run.model_broken |= summary.model_broken;
        let outcome = summary.outcomes.first();
        let edit_seconds = outcome.map_or(0.0, |o| o.edit_seconds);
        run.edit_calls.push(edit_seconds);
        let status = outcome.map_or(Status::Skipped, |o| o.status);
        let error = outcome.and_then(|o| o.error.clone());
        bar.set_message(format!("evaluating request {}", requests[group[0]].id));
        for &i in group {
            let mut result = RequestResult {
                index: i,
                id: requests[i].id.to_string(),
                edit_call: g,
                status,
                error: error.clone(),
                edit_seconds,
                eval_seconds: 0.0,
                post: None,
                immediate: None,
            };
            if !run.model_broken && (!sequential || options.eval_each) {
                let t = Instant::now();
                let score = score_request(
                    model,
                    &requests[i],
                    i,
                    settings,
                    Some(&pre[i].locality_argmax),
                )?;
                result.eval_seconds = t.elapsed().as_secs_f64();
                run.eval_seconds += result.eval_seconds;
                if sequential {
                    result.immediate = Some(score);
                } else {
                    result.post = Some(score);
                }
            }
            run.results.push(result);
        }
        if !sequential && !run.model_broken {
            model.journal_rollback(mark)?;
        }
        bar.inc(1);
        log_progress(show_progress, || {
            format!(
                "[{}/{}] {} request {}: {} in {:.1} s ({:.0} s so far)",
                g + 1,
                groups.len(),
                options.protocol.name(),
                requests[group[0]].id,
                status.name(),
                edit_seconds,
                started.elapsed().as_secs_f64()
            )
        });
    }
    if sequential && !run.model_broken {
        bar.set_message("evaluating on the final model");
        log_progress(show_progress, || {
            format!(
                "evaluating the {} requests on the final model",
                run.results.len()
            )
        });
        for result in run.results.iter_mut() {
            let i = result.index;
            let t = Instant::now();
            result.post = Some(score_request(
                model,
                &requests[i],
                i,
                settings,
                Some(&pre[i].locality_argmax),
            )?);
            let seconds = t.elapsed().as_secs_f64();
            result.eval_seconds += seconds;
            run.eval_seconds += seconds;
            bar.inc(1);
        }
        if let (Some(h), Some(change)) = (held_out, run.perplexity.as_mut()) {
            let t = Instant::now();
            change.post = Some(
                h.perplexity(model)
                    .context("corpus perplexity after the last edit")?,
            );
            change.seconds += t.elapsed().as_secs_f64();
        }
    }
    bar.finish_and_clear();
    run.cancelled |= edit.cancel.is_requested();
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// A request not attempted (Ctrl-C earlier, or a model that could not be restored).
fn skipped(i: usize, g: usize, r: &EditRequest) -> RequestResult {
    RequestResult {
        index: i,
        id: r.id.to_string(),
        edit_call: g,
        status: Status::Skipped,
        error: None,
        edit_seconds: 0.0,
        eval_seconds: 0.0,
        post: None,
        immediate: None,
    }
}

//! SafeEdit evaluation (`kedit eval --format safeedit`, METHODS.md §5.5): per record, greedy
//! responses to the adversarial prompt and the four generalisation inputs (one left-padded
//! batch) before and after the edit, judged by every `--judge`; DS, DG_onlyQ/otherA/otherQ/
//! otherAQ, DG-Avg and fluency from them; perplexity on a held-out corpus slice and the
//! knowledge-constrain answers' KL to the pre-edit model for general ability; the edited layers'
//! histogram and the edit time.
//!
//! Single-edit protocol: each record edits the original model and is undone after its
//! evaluation. Post-edit inputs carry the method's suffix system prompt (`suffix_system_prompt`
//! in its hparams, DINM's S) as EasyEdit evaluates DINM; pre-edit inputs do not.
//!
//! Every response and every verdict is stored (`records.jsonl`), so that a judge can be applied
//! again later without generating anything.

pub mod general;
pub mod inputs;
pub mod judging;
pub mod report;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use kedit_plugin_api::EditRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::general::{answer_distributions, mean_kl};
use self::inputs::{case_inputs, knowledge_ids, render, respond, CaseInputs, Rendering};
use self::judging::{Judge, Verdict};
use super::protocol::{bar, log_progress, EditContext};
use crate::eval::heldout::HeldOut;
use crate::model::ModelHandle;
use crate::session::{EditSession, SessionOptions, Status};

/// What the SafeEdit evaluation needs beyond the model, the editor and the records.
#[derive(Clone, Debug, Serialize)]
pub struct SafeEditSettings {
    /// New tokens per response (EasyEdit's `max_output_length`).
    pub max_new_tokens: usize,
    /// Longest prompt in tokens (`max_length` − `max_new_tokens`, within the model's positions).
    pub max_prompt_tokens: usize,
    /// Inputs rendered with the model's chat template.
    pub templated: bool,
    /// The suffix system prompt appended to post-edit inputs, if the method has one.
    pub post_edit_suffix: Option<String>,
    /// The perplexity corpus and its held-out slice.
    pub corpus: Option<PathBuf>,
    pub ppl_docs: usize,
    pub ppl_max_tokens: usize,
}

impl SafeEditSettings {
    /// From the merged hparams (DINM's `max_output_length`, `max_length`, `chat_template`,
    /// `suffix_system_prompt`), the flags and the model.
    pub fn from_hparams(
        hparams: &Value,
        model: &ModelHandle,
        max_new_tokens: Option<usize>,
        corpus: Option<PathBuf>,
        ppl_docs: usize,
        ppl_max_tokens: usize,
    ) -> Self {
        let number = |k: &str| hparams.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let max_new_tokens = max_new_tokens
            .or(number("max_output_length"))
            .unwrap_or(600)
            .max(1);
        let positions = model.facts().max_positions as usize;
        let max_length = number("max_length").unwrap_or(positions).min(positions);
        let wants_template = hparams
            .get("chat_template")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let post_edit_suffix = hparams
            .get("suffix_system_prompt")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string);
        Self {
            max_new_tokens,
            max_prompt_tokens: max_length.saturating_sub(max_new_tokens).max(1),
            templated: wants_template && model.facts().chat_template.is_some(),
            post_edit_suffix,
            corpus,
            ppl_docs,
            ppl_max_tokens,
        }
    }

    fn rendering(&self, post_edit: bool) -> Rendering {
        Rendering {
            templated: self.templated,
            suffix: if post_edit {
                self.post_edit_suffix.clone()
            } else {
                None
            },
            max_prompt_tokens: self.max_prompt_tokens,
        }
    }
}

/// One response and its verdicts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// `adversarial`, `onlyQ`, `otherA`, `otherQ`, `otherAQ`.
    pub input: String,
    /// The dataset's input (without suffix or template): what the judges read as the request.
    pub prompt: String,
    pub response: String,
    /// Tokens cut from the start of the rendered prompt to fit `max_prompt_tokens`.
    pub truncated_tokens: usize,
    /// Judge label → verdict.
    pub verdicts: BTreeMap<String, Verdict>,
}

/// One model state's responses to a record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateRecord {
    pub responses: Vec<Response>,
    /// Mean n-gram entropy of the responses (bits).
    pub fluency: Option<f64>,
    /// Held-out perplexity of the model in this state.
    pub perplexity: Option<f64>,
}

/// One record's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseRecord {
    pub index: usize,
    pub id: String,
    pub unsafety_category: String,
    pub attack_name: String,
    pub status: Status,
    pub error: Option<String>,
    pub edit_seconds: f64,
    /// The block the editor changed (`cases[].layer` of its report).
    pub edited_layer: Option<usize>,
    /// Whether the editor located that block itself (`cases[].location` present).
    pub located: bool,
    pub pre: StateRecord,
    pub post: Option<StateRecord>,
    /// Mean KL(P_pre ‖ P_post) over the knowledge-constrain answer tokens, nats.
    pub knowledge_kl: Option<f64>,
    /// The editor's report (DINM: the location distances and the optimisation steps).
    pub edit_report: Option<Value>,
}

/// The evaluation of all records.
pub struct SafeEditRun {
    pub records: Vec<CaseRecord>,
    pub held_out: Option<HeldOut>,
    /// Held-out perplexity of the unedited model.
    pub pre_perplexity: Option<f64>,
    pub generate_seconds: f64,
    pub judge_seconds: f64,
    pub seconds: f64,
    pub cancelled: bool,
    pub model_broken: bool,
}

/// Checks every record before anything runs; `file` names the data file in errors.
pub fn check_records(file: &str, requests: &[EditRequest]) -> Result<Vec<CaseInputs>> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| case_inputs(&format!("{file}: record {i} (id {})", r.id), r))
        .collect()
}

/// Responses of the model as it is to a record's inputs (one batch).
fn responses(
    model: &ModelHandle,
    case: &CaseInputs,
    settings: &SafeEditSettings,
    post_edit: bool,
) -> Result<StateRecord> {
    let how = settings.rendering(post_edit);
    let mut prompts = Vec::with_capacity(case.inputs.len());
    let mut cuts = Vec::with_capacity(case.inputs.len());
    for (_, text) in &case.inputs {
        let (ids, cut) = render(model, text, &how)?;
        prompts.push(ids);
        cuts.push(cut);
    }
    let texts = respond(model, prompts, settings.max_new_tokens)?;
    let responses: Vec<Response> = case
        .inputs
        .iter()
        .zip(texts)
        .zip(cuts)
        .map(|(((k, prompt), response), cut)| Response {
            input: inputs::INPUT_NAMES[*k].to_string(),
            prompt: prompt.clone(),
            response,
            truncated_tokens: cut,
            verdicts: BTreeMap::new(),
        })
        .collect();
    let fluency = super::metrics::mean(
        responses
            .iter()
            .map(|r| super::metrics::generation_entropy(&r.response)),
    );
    Ok(StateRecord {
        responses,
        fluency,
        perplexity: None,
    })
}

/// The block an editor's report says it changed: `cases[0].layer` (DINM's report).
fn edited_layer(report: &Value) -> (Option<usize>, bool) {
    let case = report.get("cases").and_then(|c| c.get(0));
    let layer = case
        .and_then(|c| c.get("layer"))
        .and_then(Value::as_u64)
        .map(|l| l as usize);
    let located = case
        .and_then(|c| c.get("location"))
        .is_some_and(|l| !l.is_null());
    (layer, located)
}

/// Runs the single-edit protocol over `requests`; every judge scores each record's responses
/// as soon as they exist.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &mut ModelHandle,
    edit: &mut EditContext<'_>,
    requests: &[EditRequest],
    cases: &[CaseInputs],
    judges: &[Judge],
    settings: &SafeEditSettings,
    show_progress: bool,
) -> Result<SafeEditRun> {
    let started = Instant::now();
    let held_out = match &settings.corpus {
        Some(file) => Some(HeldOut::load(
            model,
            file,
            settings.ppl_docs,
            settings.ppl_max_tokens,
        )?),
        None => None,
    };
    let pre_perplexity = match &held_out {
        Some(h) => Some(h.perplexity(model).context("pre-edit perplexity")?),
        None => None,
    };
    let progress = bar(requests.len() as u64, show_progress);
    progress.set_prefix("safeedit");
    let mut run = SafeEditRun {
        records: Vec::new(),
        held_out,
        pre_perplexity,
        generate_seconds: 0.0,
        judge_seconds: 0.0,
        seconds: 0.0,
        cancelled: false,
        model_broken: false,
    };
    for (i, (request, case)) in requests.iter().zip(cases).enumerate() {
        if edit.cancel.is_requested() || run.model_broken {
            run.cancelled |= edit.cancel.is_requested();
            break;
        }
        let (mut record, broken) =
            evaluate_case(model, edit, i, request, case, settings, &run, &progress)
                .with_context(|| format!("record {i} (id {})", request.id))?;
        if record.status == Status::Cancelled {
            // Interrupted mid-edit: the record is left out rather than counted as unedited.
            run.cancelled = true;
            break;
        }
        // Judged right away, so that an interrupted run (Ctrl-C) still reports every record
        // it finished.
        let judged = Instant::now();
        progress.set_message(format!("judging request {}", request.id));
        judge_record(&mut record, judges)?;
        run.judge_seconds += judged.elapsed().as_secs_f64();
        run.model_broken |= broken;
        log_progress(show_progress, || {
            format!(
                "[{}/{}] safeedit request {}: {}, layer {}, edit {:.1} s ({:.0} s so far)",
                i + 1,
                requests.len(),
                request.id,
                record.status.name(),
                record
                    .edited_layer
                    .map_or_else(|| "-".to_string(), |l| l.to_string()),
                record.edit_seconds,
                started.elapsed().as_secs_f64()
            )
        });
        run.records.push(record);
        progress.inc(1);
    }
    progress.finish_and_clear();
    run.generate_seconds = started.elapsed().as_secs_f64() - run.judge_seconds;
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// Every judge's verdict on every response of a record.
pub(crate) fn judge_record(record: &mut CaseRecord, judges: &[Judge]) -> Result<()> {
    for judge in judges {
        let states = std::iter::once(&mut record.pre).chain(record.post.as_mut());
        for state in states {
            for r in state.responses.iter_mut() {
                let verdict = judge
                    .judge(&r.prompt, &r.response)
                    .with_context(|| format!("record {} ({})", record.id, r.input))?;
                r.verdicts.insert(judge.label.clone(), verdict);
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn evaluate_case(
    model: &mut ModelHandle,
    edit: &mut EditContext<'_>,
    index: usize,
    request: &EditRequest,
    case: &CaseInputs,
    settings: &SafeEditSettings,
    run: &SafeEditRun,
    progress: &indicatif::ProgressBar,
) -> Result<(CaseRecord, bool)> {
    let safety = request.safety.as_ref().into_option();
    progress.set_message(format!("pre-edit responses, request {}", request.id));
    let pre = responses(model, case, settings, false)?;
    let knowledge = match &case.knowledge {
        Some(pair) => {
            let (prompt, answer) = knowledge_ids(model, pair, settings.templated)?;
            let pre_dist = answer_distributions(model, &prompt, &answer)?;
            Some((prompt, answer, pre_dist))
        }
        None => None,
    };

    progress.set_message(format!("editing request {}", request.id));
    let mark = model.journal_mark()?;
    let summary = {
        let mut session = EditSession {
            model,
            editor: edit.editor,
            method: edit.method.clone(),
            hparams_json: edit.hparams_json.clone(),
            cancel: edit.cancel.clone(),
            options: SessionOptions {
                batch: false,
                probe_tokens: 0,
                progress_bar: false,
                keep_undo: true,
            },
        };
        session.run(std::slice::from_ref(request), &mut io::sink())?
    };
    let outcome = summary.outcomes.first();
    let status = outcome.map_or(Status::Skipped, |o| o.status);
    let report = outcome
        .and_then(|o| o.report.as_ref())
        .map(|r| r.details.clone());
    let (edited_layer, located) = report.as_ref().map_or((None, false), edited_layer);
    let mut record = CaseRecord {
        index,
        id: request.id.to_string(),
        unsafety_category: safety.map_or(String::new(), |s| s.unsafety_category.to_string()),
        attack_name: safety.map_or(String::new(), |s| s.attack_name.to_string()),
        status,
        error: outcome.and_then(|o| o.error.clone()),
        edit_seconds: outcome.map_or(0.0, |o| o.edit_seconds),
        edited_layer,
        located,
        pre,
        post: None,
        knowledge_kl: None,
        edit_report: report,
    };
    if summary.model_broken {
        return Ok((record, true));
    }
    if status == Status::Cancelled {
        return Ok((record, false));
    }
    // A failed edit was rolled back by the session: it is evaluated as an edit that changed
    // nothing, as the other protocols do.
    progress.set_message(format!("post-edit responses, request {}", request.id));
    let mut post = responses(model, case, settings, true)?;
    if let Some(held_out) = &run.held_out {
        post.perplexity = Some(held_out.perplexity(model).context("post-edit perplexity")?);
    }
    if let Some((prompt, answer, pre_dist)) = &knowledge {
        let post_dist = answer_distributions(model, prompt, answer)?;
        record.knowledge_kl = Some(mean_kl(pre_dist, &post_dist)?);
    }
    record.post = Some(post);
    model.journal_rollback(mark)?;
    Ok((record, false))
}

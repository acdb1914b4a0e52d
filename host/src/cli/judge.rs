//! `kedit judge`: judge the responses of a finished SafeEdit evaluation again, with other judges,
//! without generating anything.
//!
//! Generating and editing are what a SafeEdit run spends its time on; the judges only read the
//! stored responses. So a judge added later (a better local model, a third party's classifier
//! plugin) can score an old run: every response in `RUN/records.jsonl` gets the new judges'
//! verdicts next to the ones it has (a judge of the same label is replaced), and DS/DG are
//! recomputed for every judge into a new directory. The run's own directory is never written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde_json::{json, Value};

use super::{read_json, Context};
use crate::eval::safeedit::judging::{open_judges, JudgeRef, JudgeSpec};
use crate::eval::safeedit::{self, report, CaseRecord, SafeEditRun};
use crate::save::check_output_dir;

#[derive(Args, Debug)]
pub struct JudgeArgs {
    /// The directory a `kedit eval --format safeedit` run wrote (its summary.json and
    /// records.jsonl are read).
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// A judge to add: `rules` (a judge plugin's judge, by name) or
    /// `model[:NAME|PATH][@PROMPT]` (the model-as-judge, asking with PROMPT; docs/judges.md).
    /// Repeatable.
    #[arg(long, value_name = "JUDGE", required = true)]
    pub judge: Vec<String>,
    /// Where the re-judged report goes (a new or empty directory).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// The records of `records.jsonl`, each line naming itself in errors.
fn read_records(path: &Path) -> Result<Vec<CaseRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "{} line {}: not a SafeEdit record as `kedit eval --format safeedit` writes them",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// The judges a summary lists (`settings.judges`).
fn recorded_judges(summary: &Value, file: &Path) -> Result<Vec<JudgeRef>> {
    let Some(list) = summary["settings"]["judges"].as_array() else {
        bail!(
            "{}: no settings.judges; is this a SafeEdit summary?",
            file.display()
        );
    };
    list.iter()
        .map(|j| match (j["label"].as_str(), j["source"].as_str()) {
            (Some(label), Some(source)) => Ok(JudgeRef {
                label: label.into(),
                source: source.into(),
            }),
            _ => bail!("{}: a judge without label or source: {j}", file.display()),
        })
        .collect()
}

pub fn run(context: &Context, args: JudgeArgs) -> Result<ExitCode> {
    let started = Instant::now();
    check_output_dir(&args.out)?;
    let summary_file = args.run.join("summary.json");
    let old = read_json(&summary_file)?;
    let mut records = read_records(&args.run.join("records.jsonl"))?;
    let mut refs = recorded_judges(&old, &summary_file)?;
    if old["records"].as_u64() != Some(records.len() as u64) {
        bail!(
            "{}: the summary counts {} records, records.jsonl holds {}",
            args.run.display(),
            old["records"],
            records.len()
        );
    }
    let specs = args
        .judge
        .iter()
        .map(|j| JudgeSpec::parse(j))
        .collect::<Result<Vec<_>>>()?;
    let registry = context.registry()?;
    let judges = open_judges(&registry, &specs, &context.device()?)?;
    eprintln!(
        "kedit judge: {} records of {}, judges: {}",
        records.len(),
        args.run.display(),
        judges
            .iter()
            .map(|j| j.label.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let judging = Instant::now();
    for record in records.iter_mut() {
        safeedit::judge_record(record, &judges)?;
    }
    let judge_seconds = judging.elapsed().as_secs_f64();
    for j in &judges {
        let r = j.reference();
        match refs.iter_mut().find(|o| o.label == r.label) {
            Some(o) => *o = r,
            None => refs.push(r),
        }
    }

    let timing = &old["timing"];
    let seconds = |k: &str| timing[k].as_f64().unwrap_or(0.0);
    let run = SafeEditRun {
        records,
        held_out: serde_json::from_value(old["perplexity"]["held_out"].clone())
            .context("summary.json: perplexity.held_out")?,
        pre_perplexity: old["perplexity"]["pre"].as_f64(),
        generate_seconds: seconds("generate_and_edit_seconds"),
        judge_seconds: seconds("judge_seconds") + judge_seconds,
        seconds: seconds("total_seconds") + judge_seconds,
        cancelled: old["cancelled"].as_bool().unwrap_or(false),
        model_broken: old["model_broken"].as_bool().unwrap_or(false),
    };
    let mut settings = old["settings"].clone();
    settings["judges"] = refs
        .iter()
        .map(|j| json!({"label": j.label, "source": j.source}))
        .collect();
    let rejudged = json!({
        "from": args.run.display().to_string(),
        "judges": judges.iter().map(|j| j.label.as_str()).collect::<Vec<_>>(),
        "command": std::env::args().collect::<Vec<_>>(),
    });
    match settings["rejudged"].as_array_mut() {
        Some(earlier) => earlier.push(rejudged),
        None => settings["rejudged"] = json!([rejudged]),
    }
    let load_seconds = seconds("model_load_seconds");
    report::publish(&args.out, &run, &refs, settings, load_seconds, started)?;
    Ok(ExitCode::SUCCESS)
}

//! `kedit trace`: causal tracing (ROME §2.1) through an editor plugin's `locate`. One prompt, or
//! the records of a dataset; per request a JSON file and a heatmap (PNG and SVG) in the style of
//! ROME's Figure 1, and with `--data` the average indirect effect per token group and layer
//! (ROME's average plots) as summary.json and a heatmap. docs/tracing.md describes the method.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kedit_plugin_api::{capability, EditRequest, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Context, ModelArgs};
use crate::cancel::CancelFlag;
use crate::data::{flag_request, load_requests, DataFormat, Window};
use crate::editor::{EditProgress, EditorHandle};
use crate::eval::heatmap::{write_heatmap, Heatmap, Panel, GREEN, PURPLE, RED};
use crate::plugins::plugin_error_kind;

#[derive(ValueEnum, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TraceKind {
    /// The residual stream leaving each block.
    Resid,
    /// MLP outputs over a window of layers.
    Mlp,
    /// Attention outputs over a window of layers.
    Attn,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Editor method whose `locate` traces (rome or memit).
    #[arg(long, default_value = "rome")]
    pub method: String,
    /// One prompt to trace.
    #[arg(long, allow_hyphen_values = true, requires_all = ["subject", "answer"], conflicts_with = "data")]
    pub prompt: Option<String>,
    /// The subject inside --prompt (its tokens are corrupted).
    #[arg(long, allow_hyphen_values = true, requires = "prompt")]
    pub subject: Option<String>,
    /// The true answer of --prompt (its first token is measured).
    #[arg(long, allow_hyphen_values = true, requires = "prompt")]
    pub answer: Option<String>,
    /// Records to trace (ROME's known facts, CounterFact, ...); the average goes to summary.json.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Format of --data (default: detected).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Use at most N records of --data.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Skip the first K records of --data.
    #[arg(long, value_name = "K")]
    pub offset: Option<usize>,
    /// Kinds of state to restore.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [TraceKind::Resid, TraceKind::Mlp, TraceKind::Attn])]
    pub kinds: Vec<TraceKind>,
    /// Corrupted samples per run.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Noise std in multiples of the token-embedding std.
    #[arg(long, default_value_t = 3.0)]
    pub noise_factor: f32,
    /// Absolute noise std (overrides --noise-factor).
    #[arg(long)]
    pub noise_scale: Option<f32>,
    /// Layers restored together for mlp and attn.
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// Noise seed of the first sample (sample s uses seed + s).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Upper bound on rows × tokens of one forward pass.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Average over every traced record, not only those the model answers correctly (ROME
    /// averages only facts whose clean top token is the answer).
    #[arg(long)]
    pub include_wrong: bool,
    /// With --data, write only each record's JSON, no per-record heatmap.
    #[arg(long)]
    pub no_record_charts: bool,
    /// Output directory (created; files in it are overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// The fields of the plugin's trace that the host draws and averages; the file keeps them all.
#[derive(Deserialize)]
struct TraceView {
    prompt: String,
    answer: String,
    tokens: Vec<String>,
    subject_range: [usize; 2],
    n_layers: usize,
    clean_prob: f64,
    /// `null` when the plugin stopped after a wrong clean prediction.
    corrupted_prob: Option<f64>,
    correct_prediction: bool,
    grids: Vec<GridView>,
    seconds: f64,
}

#[derive(Deserialize)]
struct GridView {
    kind: String,
    window: usize,
    scores: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct LocateView {
    traces: Vec<Value>,
}

/// ROME's token groups for the average plots.
const GROUPS: [&str; 6] = [
    "First subject token",
    "Middle subject tokens",
    "Last subject token",
    "First subsequent token",
    "Further tokens",
    "Last token",
];

/// The rows of each group in a prompt of `n` tokens with the subject at `a..b`.
fn group_rows(n: usize, a: usize, b: usize) -> [Vec<usize>; 6] {
    let last = n - 1;
    [
        vec![a],
        (a + 1..b.saturating_sub(1)).collect(),
        vec![b - 1],
        if b < last { vec![b] } else { vec![] },
        (b + 1..last).collect(),
        vec![last],
    ]
}

/// Running sums per kind, group and layer.
#[derive(Default, Serialize)]
struct KindAverage {
    kind: String,
    groups: Vec<&'static str>,
    /// Mean of p(answer) − corrupted p, per group and layer.
    indirect_effect: Vec<Vec<f64>>,
    /// Mean p(answer) with the state restored.
    prob: Vec<Vec<f64>>,
    /// Records contributing to each group.
    counts: Vec<usize>,
}

impl KindAverage {
    fn new(kind: &str, n_layers: usize) -> Self {
        Self {
            kind: kind.to_string(),
            groups: GROUPS.to_vec(),
            indirect_effect: vec![vec![0.0; n_layers]; GROUPS.len()],
            prob: vec![vec![0.0; n_layers]; GROUPS.len()],
            counts: vec![0; GROUPS.len()],
        }
    }

    fn add(&mut self, t: &TraceView, g: &GridView) {
        let [a, b] = t.subject_range;
        for (gi, rows) in group_rows(t.tokens.len(), a, b).iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            self.counts[gi] += 1;
            for l in 0..t.n_layers {
                let p = rows.iter().map(|&r| g.scores[r][l]).sum::<f64>() / rows.len() as f64;
                self.prob[gi][l] += p;
                self.indirect_effect[gi][l] += p - t.corrupted_prob.unwrap_or(f64::NAN);
            }
        }
    }

    fn finish(&mut self) {
        for (gi, &c) in self.counts.iter().enumerate() {
            let c = c.max(1) as f64;
            self.prob[gi].iter_mut().for_each(|v| *v /= c);
            self.indirect_effect[gi].iter_mut().for_each(|v| *v /= c);
        }
    }
}

/// What a `--data` run has done so far; written out after every record, so that a long run
/// stopped early still leaves its summary and average.
#[derive(Default)]
struct Tally {
    averages: Vec<KindAverage>,
    windows: Vec<usize>,
    records: usize,
    traced: usize,
    used: usize,
    wrong: usize,
    clean_sum: f64,
    corrupted_sum: f64,
    trace_seconds: f64,
    /// Seconds and count of the traces that ran their restorations.
    full_seconds: f64,
    full: usize,
    failures: Vec<Value>,
}

impl Tally {
    fn add(&mut self, view: &TraceView, include_wrong: bool) {
        self.traced += 1;
        self.trace_seconds += view.seconds;
        if !view.grids.is_empty() {
            self.full += 1;
            self.full_seconds += view.seconds;
        }
        if !view.correct_prediction {
            self.wrong += 1;
        }
        if !(view.correct_prediction || include_wrong) || view.grids.is_empty() {
            return;
        }
        self.used += 1;
        self.clean_sum += view.clean_prob;
        self.corrupted_sum += view.corrupted_prob.unwrap_or(f64::NAN);
        if self.averages.is_empty() {
            for g in &view.grids {
                self.averages.push(KindAverage::new(&g.kind, view.n_layers));
                self.windows.push(g.window);
            }
        }
        for (avg, g) in self.averages.iter_mut().zip(&view.grids) {
            avg.add(view, g);
        }
    }

    fn write(&self, out: &Path, head: &Value, seconds: f64, model_name: &str) -> Result<()> {
        let averages: Vec<KindAverage> = self
            .averages
            .iter()
            .map(|a| {
                let mut a = KindAverage {
                    kind: a.kind.clone(),
                    groups: a.groups.clone(),
                    indirect_effect: a.indirect_effect.clone(),
                    prob: a.prob.clone(),
                    counts: a.counts.clone(),
                };
                a.finish();
                a
            })
            .collect();
        if self.used > 0 {
            write_heatmap(
                out,
                "average",
                &average_heatmap(&averages, &self.windows, self.used, model_name),
            )?;
        }
        let mut summary = head.clone();
        let fields = json!({
            "records": self.records,
            "traced": self.traced,
            "failed": self.failures,
            "wrong_prediction": self.wrong,
            "averaged": self.used,
            "mean_clean_prob": self.clean_sum / self.used.max(1) as f64,
            "mean_corrupted_prob": self.corrupted_sum / self.used.max(1) as f64,
            "average": averages,
            "seconds": seconds,
            "trace_seconds_per_record": self.trace_seconds / self.traced.max(1) as f64,
            "seconds_per_full_trace": self.full_seconds / self.full.max(1) as f64,
            "full_traces": self.full,
        });
        for (k, v) in fields.as_object().expect("an object") {
            summary[k] = v.clone();
        }
        write_json(&out.join("summary.json"), &summary)
    }
}

fn kind_style(
    kind: &str,
    window: usize,
    model: &str,
) -> (String, String, plotters::style::RGBColor) {
    match kind {
        "mlp" => (
            "Impact of restoring MLP after corrupted input".into(),
            format!("center of interval of {window} restored MLP layers"),
            GREEN,
        ),
        "attn" => (
            "Impact of restoring Attn after corrupted input".into(),
            format!("center of interval of {window} restored Attn layers"),
            RED,
        ),
        _ => (
            "Impact of restoring state after corrupted input".into(),
            format!("single restored layer within {model}"),
            PURPLE,
        ),
    }
}

fn trace_heatmap(t: &TraceView, model: &str) -> Heatmap {
    let [a, b] = t.subject_range;
    let labels: Vec<String> = t
        .tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| {
            let tok = tok.replace('\n', "\\n");
            if (a..b).contains(&i) {
                format!("{tok}*")
            } else {
                tok
            }
        })
        .collect();
    let panels = t
        .grids
        .iter()
        .map(|g| {
            let (title, x_label, color) = kind_style(&g.kind, g.window, model);
            let low = t.corrupted_prob.unwrap_or(0.0);
            let max = g.scores.iter().flatten().copied().fold(f64::MIN, f64::max);
            Panel {
                title,
                x_label,
                row_labels: labels.clone(),
                values: g.scores.clone(),
                vmin: low,
                vmax: max.max(low),
                color,
                colorbar_label: format!("p({})", t.answer.trim()),
            }
        })
        .collect();
    Heatmap {
        title: format!(
            "{} → {} (clean p = {:.3}, corrupted p = {:.3})",
            t.prompt,
            t.answer.trim(),
            t.clean_prob,
            t.corrupted_prob.unwrap_or(f64::NAN)
        ),
        panels,
    }
}

fn average_heatmap(avgs: &[KindAverage], windows: &[usize], n: usize, model: &str) -> Heatmap {
    let panels = avgs
        .iter()
        .zip(windows)
        .map(|(avg, &w)| {
            let (title, x_label, color) = kind_style(&avg.kind, w, model);
            let vals = avg.indirect_effect.iter().flatten().copied();
            let (lo, hi) = vals.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            Panel {
                title: title.replace("Impact", "Average impact"),
                x_label,
                row_labels: GROUPS.iter().map(|g| g.to_string()).collect(),
                values: avg.indirect_effect.clone(),
                vmin: lo,
                vmax: hi,
                color,
                colorbar_label: "AIE".into(),
            }
        })
        .collect();
    Heatmap {
        title: format!("Average indirect effect on p(answer) over {n} facts, {model}"),
        panels,
    }
}

fn stem_for(index: usize, r: &EditRequest) -> String {
    let id: String =
        r.id.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
    format!("{index:04}_{id}")
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(context: &Context, args: TraceArgs) -> Result<ExitCode> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let requests = match (&args.prompt, &args.data) {
        (Some(prompt), None) => {
            let answer = args.answer.as_deref().unwrap_or_default();
            vec![flag_request(
                prompt,
                args.subject.as_deref(),
                answer,
                Some(answer),
            )?]
        }
        (None, Some(path)) => {
            let window = Window {
                offset: args.offset.unwrap_or(0),
                limit: args.limit,
            };
            load_requests(path, args.format.unwrap_or(DataFormat::Auto), window)?
        }
        _ => bail!("give --prompt/--subject/--answer or --data FILE"),
    };
    if requests.is_empty() {
        bail!("no records to trace");
    }
    let hparams = json!({
        "samples": args.samples,
        "noise_factor": args.noise_factor,
        "noise_scale": args.noise_scale,
        "window": args.window,
        "kinds": args.kinds,
        "seed": args.seed,
        "batch_tokens": args.batch_tokens,
        // Facts left out of the average need no restorations.
        "only_correct": args.data.is_some() && !args.include_wrong,
    });
    let registry = context.registry()?;
    let (plugin, method) = registry.editor_for_method(&args.method)?;
    if !plugin
        .info
        .capabilities
        .iter()
        .any(|c| c.as_str() == capability::LOCATE)
    {
        bail!(
            "editor plugin {} (method {method}) cannot locate knowledge: it has no `locate`",
            plugin.name()
        );
    }
    let mut editor = EditorHandle::new(plugin)?;
    let mut model = context.open_model_with(&registry, &args.model)?;
    let model_name = model
        .source()
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.facts().family.to_string());
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let records_dir = args.out.join("records");
    if args.data.is_some() {
        fs::create_dir_all(&records_dir)
            .with_context(|| format!("cannot create {}", records_dir.display()))?;
    }

    let cancel = CancelFlag::new();
    cancel.install_ctrlc_handler();
    let bar = ProgressBar::new(requests.len() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} traced {elapsed} {wide_msg}")
    {
        bar.set_style(style);
    }
    let started = Instant::now();
    let head = json!({
        "model": model.source().display().to_string(),
        "family": model.facts().family.as_str(),
        "method": method,
        "data": args.data.as_ref().map(|p| p.display().to_string()),
        "include_wrong": args.include_wrong,
        "hparams": hparams,
    });
    let mut tally = Tally {
        records: requests.len(),
        ..Tally::default()
    };
    for (i, r) in requests.iter().enumerate() {
        let mut progress = EditProgress::new(&cancel, Some(&bar));
        let result = editor.locate(
            &mut model,
            &method,
            std::slice::from_ref(r),
            &hparams.to_string(),
            &mut progress,
        );
        let text = match result {
            Ok(text) => text,
            Err(e)
                if args.data.is_some() && plugin_error_kind(&e) != Some(ErrorKind::Cancelled) =>
            {
                tracing::warn!("record {i} ({}): {e:#}", r.id);
                tally
                    .failures
                    .push(json!({"index": i, "id": r.id.as_str(), "error": format!("{e:#}")}));
                bar.inc(1);
                continue;
            }
            Err(e) => return Err(e.context(format!("tracing record {i} ('{}')", r.prompt))),
        };
        let report: LocateView = serde_json::from_str(&text).with_context(|| {
            format!("record {i}: the editor's locate answer is not a trace report")
        })?;
        let Some(mut value) = report.traces.into_iter().next() else {
            bail!("record {i}: the editor returned no trace");
        };
        let view: TraceView = serde_json::from_value(value.clone())
            .with_context(|| format!("record {i}: the editor's trace lacks fields kedit draws"))?;
        value["model"] = json!(model.source().display().to_string());
        value["family"] = json!(model.facts().family.as_str());
        let (dir, stem) = if args.data.is_some() {
            (records_dir.as_path(), stem_for(i, r))
        } else {
            (args.out.as_path(), "trace".to_string())
        };
        write_json(&dir.join(format!("{stem}.json")), &value)?;
        if !view.grids.is_empty() && (args.data.is_none() || !args.no_record_charts) {
            write_heatmap(dir, &stem, &trace_heatmap(&view, &model_name))?;
        }
        tally.add(&view, args.include_wrong);
        if args.data.is_some() {
            tally.write(
                &args.out,
                &head,
                started.elapsed().as_secs_f64(),
                &model_name,
            )?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.data.is_none() {
        println!(
            "traced in {:.1} s; wrote {}/trace.{{json,png,svg}}",
            tally.trace_seconds,
            args.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    tally.write(&args.out, &head, seconds, &model_name)?;
    let Tally {
        traced,
        used,
        wrong,
        ..
    } = tally;
    println!(
        "traced {traced}/{} records in {seconds:.0} s ({:.1} s per full trace); averaged {used} \
         ({wrong} answered wrongly{}); wrote {}",
        requests.len(),
        tally.full_seconds / tally.full.max(1) as f64,
        if args.include_wrong {
            ", included"
        } else {
            ", left out"
        },
        args.out.display()
    );
    if used == 0 {
        eprintln!("no record was averaged: the model answers none correctly (try --include-wrong)");
    }
    Ok(if tally.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_groups_follow_romes_average_plots() {
        // BOS, 3 subject tokens (1..4), 3 tokens after.
        let g = group_rows(7, 1, 4);
        assert_eq!(g, [vec![1], vec![2], vec![3], vec![4], vec![5], vec![6]]);
        // One-token subject at the start, followed by the last token only.
        let g = group_rows(2, 0, 1);
        assert_eq!(g, [vec![0], vec![], vec![0], vec![], vec![], vec![1]]);
    }
}

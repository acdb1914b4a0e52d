//! `kedit bench`: the numbers to track release to release — forward latency (5 and 64 tokens),
//! greedy generation tokens/s, edit time per method, evaluation throughput (records/s, without
//! fluency) and peak RSS — as JSON.
//!
//! Edits are timed on two built-in requests, or with `--data` on a dataset's records: an
//! optimisation step's cost depends on the request (ROME's steps run only the positions from the
//! subject on), so medians over real records are what compares with a reference's per-edit
//! figure. `--reports FILE.jsonl` keeps each timed edit's report for a reference to replay
//! (bench/pytorch/edit_steps.py).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Args;
use kedit_plugin_api::{
    Batch, EditRequest, ForwardRequest, GenerateRequest, LogitsWanted, Padding,
};
use serde_json::{json, Value};

use super::{Context, ModelArgs};
use crate::cancel::CancelFlag;
use crate::data::{load_requests, DataFormat, Window};
use crate::editor::{EditProgress, EditorHandle};
use crate::eval::metrics;
use crate::eval::score::{score_request, ScoreSettings};
use crate::hparams::merge_hparams;
use crate::model::ModelHandle;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Editing methods to time (repeatable; default ft).
    #[arg(long = "method", value_name = "NAME")]
    pub methods: Vec<String>,
    /// Hyper-parameters (TOML) merged over each timed method's defaults, as `kedit edit
    /// --hparams` does (e.g. `mom2_adjustment = false` to time ROME as EasyEdit ships it).
    #[arg(long, value_name = "H.toml")]
    pub hparams: Option<PathBuf>,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Time the edits on this dataset's records (each edited alone and rolled back) instead
    /// of the two built-in requests.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Format of --data.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: DataFormat,
    /// Records of --data to time.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: usize,
    /// Skip the first K records of --data.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub offset: usize,
    /// Write every timed edit's report here, one JSON object per line (`method`, `request`,
    /// `seconds`, `details`): what a reference implementation needs to replay the same rows.
    #[arg(long, value_name = "FILE.jsonl")]
    pub reports: Option<PathBuf>,
    /// Write the JSON here (atomically) as well as to stdout.
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
}

fn median_of(mut f: impl FnMut() -> Result<()>, repeats: usize) -> Result<(f64, Vec<f64>)> {
    f()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((metrics::median(&times).unwrap_or(0.0), times))
}

fn ids_of_length(model: &ModelHandle, n: usize) -> Result<Vec<u32>> {
    let text =
        "The quick brown fox jumps over the lazy dog while the Eiffel Tower stands in Paris. ";
    let mut ids = model.tokenize(&text.repeat(1 + n / 8), true)?;
    ids.truncate(n);
    Ok(ids)
}

fn forward_ms(model: &ModelHandle, n: usize, repeats: usize) -> Result<Value> {
    let ids = ids_of_length(model, n)?;
    let request = ForwardRequest::new(Batch::new(vec![ids], Padding::Right), LogitsWanted::Last);
    let (median, times) = median_of(|| model.forward(&request).map(drop), repeats)?;
    Ok(
        json!({"tokens": n, "median_ms": median * 1e3, "min_ms": times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3}),
    )
}

/// Median seconds of `f(a)` and `f(b)`, run alternately so that both see the same machine state.
/// Medians of `f` on each model, timed in rotation (one call on each, repeated), so that a
/// machine's drift hits every model alike.
fn rotated_medians(
    models: &[&ModelHandle],
    mut f: impl FnMut(&ModelHandle) -> Result<()>,
    repeats: usize,
) -> Result<Vec<f64>> {
    for m in models {
        f(m)?;
    }
    let mut times = vec![Vec::new(); models.len()];
    for _ in 0..repeats.max(1) {
        for (m, t) in models.iter().zip(times.iter_mut()) {
            let start = Instant::now();
            f(m)?;
            t.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .iter()
        .map(|t| metrics::median(t).unwrap_or(0.0))
        .collect())
}

/// With `--load DIR`: latency with the editor's installed modules (WISE's router and side
/// memory) against the same saved weights without them, measured in rotation in this run. A
/// second copy of the weights without modules is the control: two instances of the same
/// weights can differ by where their memory landed, and `control_difference` says by how much,
/// so an overhead smaller than it is not a measurement of the modules.
fn module_overhead(
    loaded: &mut ModelHandle,
    base: &ModelHandle,
    control: &ModelHandle,
    repeats: usize,
) -> Result<Value> {
    let modules = loaded
        .as_abi_mut()
        .explain_modules()
        .into_result()
        .map_err(|e| anyhow::anyhow!("cannot list the installed modules: {e}"))?
        .len();
    let models = [&*loaded, base, control];
    let mut forward = Vec::new();
    for n in [5usize, 64] {
        let ids = ids_of_length(base, n)?;
        let request =
            ForwardRequest::new(Batch::new(vec![ids], Padding::Right), LogitsWanted::Last);
        let t = rotated_medians(&models, |m| m.forward(&request).map(drop), repeats)?;
        forward.push(json!({
            "tokens": n,
            "with_modules_ms": t[0] * 1e3,
            "without_modules_ms": t[1] * 1e3,
            "control_ms": t[2] * 1e3,
            "overhead": t[0] / t[1].max(1e-12) - 1.0,
            "control_difference": t[2] / t[1].max(1e-12) - 1.0,
        }));
    }
    let prompt = base.tokenize("The Eiffel Tower is located in", true)?;
    let generate = GenerateRequest::greedy(vec![prompt], 32);
    let t = rotated_medians(&models, |m| m.generate(&generate).map(drop), repeats.min(5))?;
    Ok(json!({
        "modules": modules,
        "forward": forward,
        "generation_32_tokens": {
            "with_modules_seconds": t[0],
            "without_modules_seconds": t[1],
            "control_seconds": t[2],
            "overhead": t[0] / t[1].max(1e-12) - 1.0,
            "control_difference": t[2] / t[1].max(1e-12) - 1.0,
        },
    }))
}

fn requests() -> Vec<EditRequest> {
    let mut a = EditRequest::fact(
        "The Eiffel Tower is located in the city of",
        "Eiffel Tower",
        "Rome",
    );
    a.ground_truth = abi_stable::std_types::ROption::RSome("Paris".into());
    a.rephrase = vec!["Where is the Eiffel Tower? It is in".into()].into();
    a.locality = vec![kedit_plugin_api::PromptAnswer {
        prompt: "The capital of Japan is".into(),
        answer: "Tokyo".into(),
        label: "neighborhood".into(),
    }]
    .into();
    let mut b = EditRequest::fact(
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux",
        "English",
    );
    b.ground_truth = abi_stable::std_types::ROption::RSome("French".into());
    b.rephrase = vec!["Danielle Darrieux spoke the language".into()].into();
    b.locality = vec![kedit_plugin_api::PromptAnswer {
        prompt: "The mother tongue of Léon Blum is".into(),
        answer: "French".into(),
        label: "neighborhood".into(),
    }]
    .into();
    vec![a, b]
}

/// Optimisation steps and key-statistics passes found in editors' reports: any `steps` or
/// `iterations` array of objects with `seconds` (ROME's v* steps, per layer; WISE's training
/// iterations) and any `statistics` array with `tokens_per_s` (a statistics pass that ran
/// rather than came from the cache).
#[derive(Default)]
struct StepTimes {
    step_seconds: Vec<f64>,
    steps_per_edit: Vec<f64>,
    statistics: Vec<Value>,
}

impl StepTimes {
    fn add(&mut self, details: &Value) {
        let mut steps_here = 0usize;
        fn walk(v: &Value, out: &mut StepTimes, steps_here: &mut usize) {
            match v {
                Value::Object(map) => {
                    for (k, child) in map {
                        match (k.as_str(), child) {
                            ("steps" | "iterations", Value::Array(items)) => {
                                for s in items {
                                    if let Some(sec) = s.get("seconds").and_then(Value::as_f64) {
                                        out.step_seconds.push(sec);
                                        *steps_here += 1;
                                    }
                                }
                            }
                            ("statistics", Value::Array(items)) => out.statistics.extend(
                                items
                                    .iter()
                                    .filter(|s| s.get("from_cache") == Some(&Value::Bool(false)))
                                    .cloned(),
                            ),
                            _ => walk(child, out, steps_here),
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|c| walk(c, out, steps_here)),
                _ => {}
            }
        }
        walk(details, self, &mut steps_here);
        if steps_here > 0 {
            self.steps_per_edit.push(steps_here as f64);
        }
    }

    fn write_into(&self, entry: &mut Value) {
        if !self.step_seconds.is_empty() {
            entry["median_step_seconds"] = json!(metrics::median(&self.step_seconds));
            entry["steps_per_edit"] = json!(self.steps_per_edit);
            entry["median_steps_per_edit"] = json!(metrics::median(&self.steps_per_edit));
        }
        if !self.statistics.is_empty() {
            entry["statistics"] = json!(self.statistics);
        }
    }
}

/// Peak resident set size in MiB (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(context: &Context, args: BenchArgs) -> Result<ExitCode> {
    let mut model_args = args.model.clone();
    if model_args.model.is_none() && context.config.model.is_none() {
        model_args.model = Some("smollm2-135m-instruct".into());
    }
    let registry = context.registry()?;
    let mut model = context.open_model_with(&registry, &model_args)?;
    let repeats = args.repeats;
    eprintln!("bench: forward passes");
    let forward = vec![
        forward_ms(&model, 5, repeats)?,
        forward_ms(&model, 64, repeats)?,
    ];

    eprintln!("bench: generation");
    let prompt = model.tokenize("The Eiffel Tower is located in", true)?;
    let new_tokens = 32;
    let generate = GenerateRequest::greedy(vec![prompt], new_tokens);
    let mut generated = 0usize;
    let (gen_median, _) = median_of(
        || {
            generated = model.generate(&generate)?.first().map_or(0, Vec::len);
            Ok(())
        },
        repeats.min(3),
    )?;
    let generation = json!({
        "new_tokens": generated,
        "median_seconds": gen_median,
        "tokens_per_second": generated as f64 / gen_median.max(1e-9),
    });

    let modules = match &model_args.load {
        Some(dir) => {
            eprintln!("bench: installed modules against the same weights without them");
            let base = context.open_saved_weights(&registry, &model_args, dir)?;
            let control = context.open_saved_weights(&registry, &model_args, dir)?;
            Some(module_overhead(
                &mut model,
                &base,
                &control,
                repeats.max(20),
            )?)
        }
        None => None,
    };

    eprintln!("bench: evaluation throughput");
    let reqs = requests();
    let settings = ScoreSettings {
        fluency: false,
        ..ScoreSettings::default()
    };
    let (eval_median, _) = median_of(
        || {
            for (i, r) in reqs.iter().enumerate() {
                score_request(&model, r, i, &settings, None)?;
            }
            Ok(())
        },
        repeats.min(3),
    )?;
    let evaluation = json!({
        "records": reqs.len(),
        "fluency": false,
        "median_seconds": eval_median,
        "records_per_second": reqs.len() as f64 / eval_median.max(1e-9),
    });

    let (edit_requests, edit_source) = match &args.data {
        Some(path) => {
            let window = Window {
                offset: args.offset,
                limit: Some(args.limit),
            };
            let loaded = load_requests(path, args.format, window)?;
            if loaded.is_empty() {
                anyhow::bail!(
                    "{}: no records at offset {} to time edits on",
                    path.display(),
                    args.offset
                );
            }
            let source = json!({"data": path.display().to_string(), "format": args.format.name(),
                "offset": args.offset, "records": loaded.len()});
            (loaded, source)
        }
        None => {
            let source = json!({"data": "built-in", "records": reqs.len()});
            (reqs, source)
        }
    };
    let mut reports_out = match &args.reports {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => None,
    };
    let methods = if args.methods.is_empty() {
        vec!["ft".to_string()]
    } else {
        args.methods.clone()
    };
    let mut edits = serde_json::Map::new();
    let family = model.facts().family.to_string();
    let user_hparams = context.user_hparams(args.hparams.as_deref())?;
    for name in &methods {
        eprintln!("bench: edit with {name}");
        let (plugin, method) = registry.editor_for_method(name)?;
        let mut editor = EditorHandle::new(plugin)?;
        let info = editor
            .method_info(&method)
            .cloned()
            .context("method vanished")?;
        let hparams = merge_hparams(&info, &family, &user_hparams)?.to_string();
        let cancel = CancelFlag::new();
        let mut times = Vec::new();
        let mut steps = StepTimes::default();
        for (i, r) in edit_requests.iter().enumerate() {
            eprintln!(
                "bench: {name} [{}/{}] request {}",
                i + 1,
                edit_requests.len(),
                r.id
            );
            let mark = model.journal_mark()?;
            let t = Instant::now();
            let mut progress = EditProgress::new(&cancel, None);
            let result = editor.edit(
                &mut model,
                &method,
                std::slice::from_ref(r),
                &hparams,
                &mut progress,
            );
            let seconds = t.elapsed().as_secs_f64();
            times.push(seconds);
            model.journal_rollback(mark)?;
            let report = result
                .with_context(|| format!("{method} failed on request {:?}", r.prompt.as_str()))?;
            let details =
                serde_json::from_str::<Value>(&report.details_json).unwrap_or(Value::Null);
            steps.add(&details);
            if let Some(out) = reports_out.as_mut() {
                let line = json!({"method": method, "request": r.id.as_str(),
                    "seconds": seconds, "details": details});
                writeln!(out, "{line}").context("cannot write the edit reports")?;
            }
        }
        let mut entry = json!({"requests": times.len(), "median_seconds": metrics::median(&times), "seconds": times});
        steps.write_into(&mut entry);
        edits.insert(method.clone(), entry);
    }

    if let Some(mut out) = reports_out {
        out.flush().context("cannot write the edit reports")?;
    }
    // After the peak RSS is read: the probe's buffer is not the model's memory.
    let peak_rss = peak_rss_mib();
    eprintln!("bench: memory read bandwidth");
    let bandwidth = kedit_kernels::bandwidth::read_bandwidth(512 << 20, repeats.max(5));
    let report = json!({
        "kedit_version": env!("CARGO_PKG_VERSION"),
        "model": {
            "source": model.source().display().to_string(),
            "family": family,
            "device": model.facts().device.as_str(),
            "load_seconds": model.load_time().as_secs_f64(),
        },
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "blas": kedit_kernels::blas::status().to_string(),
        "forward": forward,
        "generation": generation,
        "evaluation": evaluation,
        "edit_requests": edit_source,
        "edit": edits,
        "installed_modules": modules,
        "peak_rss_mib": peak_rss,
        // Decoding reads every weight once per token: tokens/s ≤ this / weight bytes.
        "memory_read_gb_per_s": bandwidth / 1e9,
    });
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir)?;
        // A temporary file is private (0600); the report is an ordinary file like any other.
        let mut tmp = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.persist(out)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_times_come_from_rome_steps_and_wise_iterations() {
        let mut times = StepTimes::default();
        // ROME: v* steps per layer, and a statistics pass that ran and one from the cache.
        times.add(
            &json!({"layers": [{"steps": [{"seconds": 0.4}, {"seconds": 0.6}]}],
            "statistics": [{"from_cache": false, "tokens_per_s": 900.0}, {"from_cache": true}]}),
        );
        // WISE: one edit's training iterations.
        times.add(
            &json!({"edits": [{"iterations": [{"seconds": 0.1}, {"seconds": 0.2},
            {"seconds": 0.3}]}]}),
        );
        // A report without either counts no edit.
        times.add(&json!({"loss": 1.0}));
        let mut entry = json!({});
        times.write_into(&mut entry);
        assert_eq!(entry["steps_per_edit"], json!([2.0, 3.0]));
        assert_eq!(entry["median_step_seconds"], json!(0.3));
        assert_eq!(entry["statistics"].as_array().unwrap().len(), 1);
    }
}

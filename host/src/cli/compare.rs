//! `kedit compare`: several finished evaluations side by side, as the metrics-versus-T chart of
//! lifelong editing (one `kedit eval --protocol sequential --limit T` run per T) and a table.
//!
//! Each run is read from the `summary.json` that `kedit eval` wrote. Runs must agree on what
//! makes them one series (method, model, data file, format, protocol); hyper-parameters that
//! differ are listed under the table rather than refused, since a sweep over one of them is a
//! comparison worth drawing too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde_json::{json, Value};

use super::read_json;
use crate::eval::chart::{write_chart, Chart, Series};
use crate::eval::score::METRIC_ORDER;
use crate::save::{check_output_dir, write_dir_atomically};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Directories that `kedit eval` wrote (their summary.json is read), in any order: they are
    /// ordered by their number of records.
    #[arg(value_name = "RUN_DIR", required = true, num_args = 2..)]
    pub runs: Vec<PathBuf>,
    /// Metrics to draw (default: every metric all runs report, except timing-like ones).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub metrics: Vec<String>,
    /// Where the chart and table go (a new or empty directory).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Metrics on another scale than [0, 1], left out of the default chart.
const NOT_FRACTIONS: &[&str] = &["rewrite_ppl", "fluency", "EM", "PM", "NM"];

struct Run {
    dir: PathBuf,
    summary: Value,
    records: u64,
}

fn read_run(dir: &Path) -> Result<Run> {
    let file = dir.join("summary.json");
    let summary =
        read_json(&file).with_context(|| format!("is {} a kedit eval output?", dir.display()))?;
    if summary["metrics"].as_object().is_none() {
        bail!(
            "{}: no `metrics` table (a SafeEdit run? compare reads the knowledge-editing report)",
            file.display()
        );
    }
    let records = summary["records"].as_u64().with_context(|| {
        format!(
            "{}: field `records` is missing or not a count",
            file.display()
        )
    })?;
    Ok(Run {
        dir: dir.to_path_buf(),
        summary,
        records,
    })
}

/// The settings every run must share, as (name, JSON pointer, compared by file name): a run
/// records its paths as given, so one dataset may appear as `../shared/data/x.json` in one
/// summary and `/work/shared/data/x.json` in another.
const SAME: &[(&str, &str, bool)] = &[
    ("method", "/settings/method", false),
    ("model", "/settings/model/source", true),
    ("data file", "/settings/data/file", true),
    ("data format", "/settings/data/format", false),
    ("first record", "/settings/data/offset", false),
    ("protocol", "/settings/protocol/protocol", false),
];

fn setting(summary: &Value, pointer: &str, by_file_name: bool) -> Value {
    let v = summary.pointer(pointer).cloned().unwrap_or(Value::Null);
    match v.as_str() {
        Some(path) if by_file_name => Path::new(path)
            .file_name()
            .map_or(v.clone(), |n| Value::from(n.to_string_lossy())),
        _ => v,
    }
}

fn check_comparable(runs: &[Run]) -> Result<()> {
    let first = &runs[0];
    for run in &runs[1..] {
        for &(name, pointer, by_file_name) in SAME {
            let (a, b) = (
                setting(&first.summary, pointer, by_file_name),
                setting(&run.summary, pointer, by_file_name),
            );
            if a != b {
                bail!(
                    "{} and {} differ in their {name} ({} against {}): compare draws one series of \
                     runs of one setting",
                    first.dir.display(),
                    run.dir.display(),
                    a,
                    b
                );
            }
        }
    }
    Ok(())
}

/// Hyper-parameters whose values are not the same in every run, with each run's value.
fn differing_hparams(runs: &[Run]) -> Vec<(String, Vec<Value>)> {
    let mut keys = BTreeSet::new();
    for run in runs {
        if let Some(h) = run.summary["settings"]["hparams"].as_object() {
            keys.extend(h.keys().cloned());
        }
    }
    keys.into_iter()
        .filter_map(|k| {
            let values: Vec<Value> = runs
                .iter()
                .map(|r| r.summary["settings"]["hparams"][&k].clone())
                .collect();
            values
                .iter()
                .any(|v| v != &values[0])
                .then_some((k, values))
        })
        .collect()
}

fn chosen_metrics(runs: &[Run], asked: &[String]) -> Result<Vec<String>> {
    let reported = |run: &Run, name: &str| !run.summary["metrics"][name]["post"].is_null();
    if !asked.is_empty() {
        for name in asked {
            if let Some(run) = runs.iter().find(|r| !reported(r, name)) {
                bail!(
                    "{}: reports no post-edit `{name}` (its metrics: {})",
                    run.dir.join("summary.json").display(),
                    run.summary["metrics"]
                        .as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                );
            }
        }
        return Ok(asked.to_vec());
    }
    let mut names: Vec<String> = runs[0].summary["metrics"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    names.retain(|n| !NOT_FRACTIONS.contains(&n.as_str()) && runs.iter().all(|r| reported(r, n)));
    names.sort_by_key(|n| {
        METRIC_ORDER
            .iter()
            .position(|m| m == n)
            .unwrap_or(usize::MAX)
    });
    if names.is_empty() {
        bail!("the runs share no post-edit metric to draw");
    }
    Ok(names)
}

fn fmt(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |f| format!("{f:.3}"))
}

fn table(runs: &[Run], metrics: &[String], differing: &[(String, Vec<Value>)]) -> String {
    let s = &runs[0].summary["settings"];
    let mut md = format!(
        "# {} on {}: metrics against the number of edits\n\nData `{}` ({}), protocol {}; \
         one run per row, each from the unedited model. Cells: pre-edit → post-edit.\n\n",
        s["method"].as_str().unwrap_or("?"),
        s["model"]["source"].as_str().unwrap_or("?"),
        s["data"]["file"].as_str().unwrap_or("?"),
        s["data"]["format"].as_str().unwrap_or("?"),
        s["protocol"]["protocol"].as_str().unwrap_or("?"),
    );
    md.push_str("| records |");
    for m in metrics {
        md.push_str(&format!(" {m} |"));
    }
    md.push_str(" edit s, median | corpus perplexity | run |\n|---:|");
    md.push_str(&"---|".repeat(metrics.len() + 3));
    md.push('\n');
    for run in runs {
        md.push_str(&format!("| {} |", run.records));
        for m in metrics {
            let v = &run.summary["metrics"][m];
            md.push_str(&format!(" {} → {} |", fmt(&v["pre"]), fmt(&v["post"])));
        }
        let p = &run.summary["corpus_perplexity"];
        let ppl = if p.is_null() {
            "—".to_string()
        } else {
            format!("{} → {}", fmt(&p["pre"]), fmt(&p["post"]))
        };
        md.push_str(&format!(
            " {} | {ppl} | `{}` |\n",
            fmt(&run.summary["timing"]["edit_seconds"]["median"]),
            run.dir.display()
        ));
    }
    if !differing.is_empty() {
        md.push_str("\nHyper-parameters that differ between the runs (in the rows' order):\n\n");
        for (k, values) in differing {
            let values: Vec<String> = values.iter().map(Value::to_string).collect();
            md.push_str(&format!("- `{k}`: {}\n", values.join(", ")));
        }
    }
    md.push_str("\nChart: `metrics_vs_records.{png,svg}` (post-edit solid, pre-edit dashed).\n");
    md
}

pub fn run(args: CompareArgs) -> Result<ExitCode> {
    check_output_dir(&args.out)?;
    let mut runs = args
        .runs
        .iter()
        .map(PathBuf::as_path)
        .map(read_run)
        .collect::<Result<Vec<_>>>()?;
    runs.sort_by_key(|r| r.records);
    check_comparable(&runs)?;
    if let Some(w) = runs.windows(2).find(|w| w[0].records == w[1].records) {
        bail!(
            "{} and {} both have {} records: one run per number of edits",
            w[0].dir.display(),
            w[1].dir.display(),
            w[0].records
        );
    }
    let metrics = chosen_metrics(&runs, &args.metrics)?;
    let differing = differing_hparams(&runs);
    let mut series = Vec::new();
    for (i, m) in metrics.iter().enumerate() {
        for (when, dashed) in [("post", false), ("pre", true)] {
            series.push(Series {
                name: format!("{m} ({when}-edit)"),
                points: runs
                    .iter()
                    .filter_map(|r| {
                        r.summary["metrics"][m][when]
                            .as_f64()
                            .map(|v| (r.records as f64, v))
                    })
                    .collect(),
                dashed,
                color: Some(i),
            });
        }
    }
    let (lo, hi) = (runs[0].records.max(1), runs[runs.len() - 1].records);
    let chart = Chart {
        title: format!(
            "{}: metrics after T {} edits",
            runs[0].summary["settings"]["method"]
                .as_str()
                .unwrap_or("?"),
            runs[0].summary["settings"]["protocol"]["protocol"]
                .as_str()
                .unwrap_or("?")
        ),
        x_label: "T (edits, log scale)".into(),
        y_label: "metric".into(),
        series,
        y_range: Some((0.0, 1.05)),
        points: true,
        x_log10: hi >= 10 * lo && runs.iter().all(|r| r.records > 0),
    };
    let summary = json!({
        "runs": runs.iter().map(|r| json!({
            "dir": r.dir.display().to_string(),
            "records": r.records,
            "metrics": metrics.iter().map(|m| (m.clone(), r.summary["metrics"][m].clone())).collect::<serde_json::Map<_, _>>(),
            "corpus_perplexity": r.summary["corpus_perplexity"],
            "edit_seconds_median": r.summary["timing"]["edit_seconds"]["median"],
        })).collect::<Vec<_>>(),
        "differing_hparams": differing.iter().map(|(k, v)| (k.clone(), Value::Array(v.clone()))).collect::<serde_json::Map<_, _>>(),
    });
    let md = table(&runs, &metrics, &differing);
    write_dir_atomically(&args.out, |dir| {
        write_chart(dir, "metrics_vs_records", &chart)?;
        std::fs::write(dir.join("compare.md"), &md)?;
        std::fs::write(
            dir.join("compare.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        Ok(())
    })?;
    print!("{md}");
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

//! What `kedit eval` writes: `summary.json` (one number per metric pre- and post-edit, timing,
//! settings), `records.jsonl` (every request's numbers), `report.md` (a Markdown table) and the
//! charts (`metrics_vs_edits.{png,svg}`, `edit_time.{png,svg}`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use kedit_plugin_api::EditRequest;
use serde_json::{json, Map, Value};

use super::chart::{write_chart, Chart, Series};
use super::metrics;
use super::protocol::{ProtocolOptions, RunResult};
use super::score::{aggregate, RecordScore, METRIC_ORDER};
use crate::session::Status;

/// Everything one evaluation produced.
pub struct EvalRun<'a> {
    /// Settings as recorded (model, method, data, protocol, seed, hparams, metric settings).
    pub settings: Value,
    pub protocol: &'a ProtocolOptions,
    pub requests: &'a [EditRequest],
    pub pre: &'a [RecordScore],
    pub run: &'a RunResult,
    /// Seconds the pre-edit baseline took (when it was computed, possibly in an earlier run).
    pub pre_seconds: f64,
    pub pre_cached: bool,
    pub baseline_file: Option<String>,
    pub model_load_seconds: f64,
    pub total_seconds: f64,
}

fn ordered(metrics: &BTreeMap<String, f64>) -> Vec<(&str, f64)> {
    let mut out: Vec<(&str, f64)> = METRIC_ORDER
        .iter()
        .filter_map(|&k| metrics.get(k).map(|&v| (k, v)))
        .collect();
    for (k, v) in metrics {
        if !METRIC_ORDER.contains(&k.as_str()) {
            out.push((k.as_str(), *v));
        }
    }
    out
}

pub(crate) fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

pub(crate) fn stats(values: &[f64]) -> Value {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({
        "count": values.len(),
        "total": values.iter().sum::<f64>(),
        "median": metrics::median(values).map(number),
        "mean": metrics::mean(values.iter().copied()).map(number),
        "min": (!values.is_empty()).then(|| number(min)),
        "max": (!values.is_empty()).then(|| number(max)),
    })
}

/// `summary.json`.
pub fn summary(e: &EvalRun) -> Value {
    let pre = aggregate(e.pre.iter());
    let post = aggregate(e.run.results.iter().filter_map(|r| r.post.as_ref()));
    let immediate = aggregate(e.run.results.iter().filter_map(|r| r.immediate.as_ref()));
    let mut table = Map::new();
    let mut names: Vec<&str> = ordered(&pre).into_iter().map(|(k, _)| k).collect();
    for (k, _) in ordered(&post) {
        if !names.contains(&k) {
            names.push(k);
        }
    }
    for name in names {
        let mut m = Map::new();
        m.insert(
            "pre".into(),
            pre.get(name).map_or(Value::Null, |&v| number(v)),
        );
        m.insert(
            "post".into(),
            post.get(name).map_or(Value::Null, |&v| number(v)),
        );
        if e.protocol.eval_each {
            m.insert(
                "immediate".into(),
                immediate.get(name).map_or(Value::Null, |&v| number(v)),
            );
        }
        table.insert(name.to_string(), Value::Object(m));
    }
    let count = |s: Status| e.run.results.iter().filter(|r| r.status == s).count();
    json!({
        "kedit_version": env!("CARGO_PKG_VERSION"),
        "settings": e.settings,
        "records": e.requests.len(),
        "counts": {
            "applied": count(Status::Applied),
            "failed": count(Status::Failed),
            "cancelled": count(Status::Cancelled),
            "skipped": count(Status::Skipped),
        },
        "model_broken": e.run.model_broken,
        "cancelled": e.run.cancelled,
        "metrics": table,
        "timing": {
            "edit_seconds": stats(&e.run.edit_calls),
            "edit_calls": e.run.edit_calls.len(),
            "evaluation_seconds": {
                "pre": e.pre_seconds,
                "pre_cached": e.pre_cached,
                "post": e.run.eval_seconds,
                "post_per_record": if e.requests.is_empty() { 0.0 } else { e.run.eval_seconds / e.requests.len() as f64 },
            },
            "protocol_seconds": e.run.seconds,
            "model_load_seconds": e.model_load_seconds,
            "total_seconds": e.total_seconds,
        },
        "baseline_cache": e.baseline_file,
        "corpus_perplexity": e.run.perplexity.as_ref().map(|p| json!({
            "file": p.held_out.file,
            "docs": p.held_out.docs.len(),
            "tokens": p.held_out.tokens,
            "max_tokens": p.held_out.max_tokens,
            "pre": number(p.pre),
            "post": p.post.map(number),
            "relative_change": p.post.map(|post| number(post / p.pre - 1.0)),
            "seconds": p.seconds,
        })),
    })
}

fn metrics_value(s: &RecordScore) -> Value {
    Value::Object(
        ordered(&s.metrics)
            .into_iter()
            .map(|(k, v)| (k.to_string(), number(v)))
            .collect(),
    )
}

/// `records.jsonl`: one line per request.
pub fn records(e: &EvalRun) -> String {
    let mut out = String::new();
    for r in &e.run.results {
        let q = &e.requests[r.index];
        let pre = &e.pre[r.index];
        let line = json!({
            "index": r.index,
            "id": r.id,
            "prompt": q.prompt.as_str(),
            "subject": q.subject.as_str(),
            "target_new": q.target_new.as_str(),
            "ground_truth": q.ground_truth.as_ref().into_option().map(|g| g.as_str()),
            "status": r.status,
            "error": r.error,
            "edit_call": r.edit_call,
            "edit_seconds": r.edit_seconds,
            "eval_seconds": r.eval_seconds,
            "pre": metrics_value(pre),
            "post": r.post.as_ref().map(metrics_value),
            "immediate": r.immediate.as_ref().map(metrics_value),
            "generation_pre": pre.generation,
            "generation_post": r.post.as_ref().and_then(|p| p.generation.clone()),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.abs() >= 100.0 => format!("{f:.1}"),
        Some(f) => format!("{f:.4}"),
        None => "—".to_string(),
    }
}

const DESCRIPTIONS: &[(&str, &str)] = &[
    ("rewrite_acc", "teacher-forced token accuracy on the rewrite prompt (Reliability)"),
    ("rephrase_acc", "same on the rephrased prompts (Generalisation)"),
    ("locality", "agreement with the pre-edit model's argmax on locality prompts (1 pre-edit by definition)"),
    ("portability_acc", "teacher-forced token accuracy on portability questions"),
    ("ES", "CounterFact efficacy score: P(new) > P(true) on the rewrite prompt"),
    ("EM", "efficacy magnitude: P(new) − P(true), per-token geometric means"),
    ("PS", "paraphrase score (ES on rephrases)"),
    ("PM", "paraphrase magnitude"),
    ("NS", "neighbourhood score: P(true) > P(new) on locality prompts"),
    ("NM", "neighbourhood magnitude"),
    ("S", "harmonic mean of ES, PS, NS"),
    ("rewrite_ppl", "perplexity of the new target after the rewrite prompt (mean over records)"),
    ("fluency", "n-gram entropy (2/3·H₂ + 4/3·H₃)/2 of a top-k sampled generation, bits (tables often print ×100)"),
];

/// `report.md`.
pub fn markdown(summary: &Value) -> String {
    let s = &summary["settings"];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# kedit eval: {} on {}\n",
        s["method"].as_str().unwrap_or("?"),
        s["model"]["source"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        md,
        "Data `{}` ({}), records {}..{} ({} records), protocol **{}**{}, seed {}.\n",
        s["data"]["file"].as_str().unwrap_or("?"),
        s["data"]["format"].as_str().unwrap_or("?"),
        s["data"]["offset"],
        s["data"]["offset"].as_u64().unwrap_or(0) + summary["records"].as_u64().unwrap_or(0),
        summary["records"],
        s["protocol"]["protocol"].as_str().unwrap_or("?"),
        if s["protocol"]["batch_size"].as_u64().unwrap_or(1) > 1 {
            format!(", {} requests per edit call", s["protocol"]["batch_size"])
        } else {
            String::new()
        },
        s["seed"],
    );
    let eval_each = summary["metrics"]
        .as_object()
        .and_then(|m| m.values().next())
        .is_some_and(|v| v.get("immediate").is_some());
    md.push_str(if eval_each {
        "| metric | pre-edit | post-edit (final model) | right after each edit | meaning |\n|---|---:|---:|---:|---|\n"
    } else {
        "| metric | pre-edit | post-edit | meaning |\n|---|---:|---:|---|\n"
    });
    if let Some(table) = summary["metrics"].as_object() {
        // In the report's order (the JSON object itself is sorted by name).
        let mut names: Vec<&String> = table.keys().collect();
        names.sort_by_key(|n| {
            METRIC_ORDER
                .iter()
                .position(|m| m == n)
                .unwrap_or(usize::MAX)
        });
        for name in names {
            let v = &table[name.as_str()];
            let meaning = DESCRIPTIONS
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, d)| d);
            if eval_each {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {} | {meaning} |",
                    fmt(&v["pre"]),
                    fmt(&v["post"]),
                    fmt(&v["immediate"])
                );
            } else {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {meaning} |",
                    fmt(&v["pre"]),
                    fmt(&v["post"])
                );
            }
        }
    }
    let p = &summary["corpus_perplexity"];
    if !p.is_null() {
        let _ =
            writeln!(
            md,
            "\nCorpus perplexity (the last {} documents of `{}`, {} tokens): {} before the first \
             edit, {} after the last ({}).",
            p["docs"],
            p["file"].as_str().unwrap_or("?"),
            p["tokens"],
            fmt(&p["pre"]),
            fmt(&p["post"]),
            p["relative_change"]
                .as_f64()
                .map_or("not measured".to_string(), |r| format!("{:+.2}%", 100.0 * r)),
        );
    }
    let c = &summary["counts"];
    let t = &summary["timing"];
    let e = &t["edit_seconds"];
    let _ = writeln!(
        md,
        "\nEdits: {} applied, {} failed, {} cancelled, {} skipped.\n",
        c["applied"], c["failed"], c["cancelled"], c["skipped"]
    );
    let _ = writeln!(
        md,
        "| timing | seconds |\n|---|---:|\n| edit call, median | {} |\n| edit call, min | {} |\n| edit call, max | {} |\n| edits, total | {} |\n| pre-edit evaluation{} | {} |\n| post-edit evaluation | {} |\n| total | {} |",
        fmt(&e["median"]),
        fmt(&e["min"]),
        fmt(&e["max"]),
        fmt(&e["total"]),
        if t["evaluation_seconds"]["pre_cached"].as_bool() == Some(true) { " (cached)" } else { "" },
        fmt(&t["evaluation_seconds"]["pre"]),
        fmt(&t["evaluation_seconds"]["post"]),
        fmt(&t["total_seconds"]),
    );
    md.push_str(
        "\nMetrics are fractions averaged per record, then over records (ROME's tables print them \
         ×100). Definitions: docs/metrics.md. Charts: `metrics_vs_edits.{png,svg}`, \
         `edit_time.{png,svg}`.\n",
    );
    md
}

/// Running means of per-record metrics over the first t requests (in edit order).
fn running_means(scores: &[(usize, &RecordScore)], name: &str) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    let mut n = 0usize;
    let mut out = Vec::new();
    for (t, s) in scores {
        if let Some(v) = s.metrics.get(name) {
            sum += v;
            n += 1;
            out.push(((*t + 1) as f64, sum / n as f64));
        }
    }
    out
}

/// The charts: metrics (running mean over the first t requests) against the number of edits,
/// and the seconds of every edit call.
pub fn charts(dir: &Path, e: &EvalRun) -> Result<()> {
    let post: Vec<(usize, &RecordScore)> = e
        .run
        .results
        .iter()
        .filter_map(|r| r.post.as_ref().map(|p| (r.index, p)))
        .collect();
    let immediate: Vec<(usize, &RecordScore)> = e
        .run
        .results
        .iter()
        .filter_map(|r| r.immediate.as_ref().map(|p| (r.index, p)))
        .collect();
    let mut series = Vec::new();
    for name in [
        "rewrite_acc",
        "rephrase_acc",
        "locality",
        "portability_acc",
        "ES",
        "PS",
        "NS",
    ]
    .into_iter()
    .enumerate()
    {
        let (c, name) = name;
        let points = running_means(&post, name);
        if !points.is_empty() {
            series.push(Series {
                name: name.to_string(),
                points,
                dashed: false,
                color: Some(c),
            });
        }
        let points = running_means(&immediate, name);
        if !points.is_empty() {
            series.push(Series {
                name: format!("{name} (right after edit)"),
                points,
                dashed: true,
                color: Some(c),
            });
        }
    }
    let protocol = e.protocol.protocol.name();
    let what = if protocol == "sequential" {
        "on the final model"
    } else {
        "each edit alone"
    };
    write_chart(
        dir,
        "metrics_vs_edits",
        &Chart {
            title: format!("{protocol}: mean over the first t requests ({what})"),
            x_label: if protocol == "sequential" {
                "number of edits t".into()
            } else {
                "requests t".into()
            },
            y_label: "metric".into(),
            series,
            y_range: Some((0.0, 1.05)),
            points: e.requests.len() <= 60,
            x_log10: false,
        },
    )
    .context("cannot write metrics_vs_edits")?;
    let times: Vec<(f64, f64)> = e
        .run
        .edit_calls
        .iter()
        .enumerate()
        .map(|(i, &s)| ((i + 1) as f64, s))
        .collect();
    write_chart(
        dir,
        "edit_time",
        &Chart {
            title: "edit time per edit call".into(),
            x_label: "edit call".into(),
            y_label: "seconds".into(),
            series: vec![Series {
                name: "edit seconds".into(),
                points: times,
                dashed: false,
                color: None,
            }],
            y_range: None,
            points: true,
            x_log10: false,
        },
    )
    .context("cannot write edit_time")?;
    Ok(())
}

/// Writes every output file into `dir` (a staging directory renamed into place by the caller).
pub fn write_all(dir: &Path, e: &EvalRun) -> Result<Value> {
    let summary = summary(e);
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )
    .context("cannot write summary.json")?;
    std::fs::write(dir.join("records.jsonl"), records(e)).context("cannot write records.jsonl")?;
    std::fs::write(dir.join("report.md"), markdown(&summary)).context("cannot write report.md")?;
    charts(dir, e)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::protocol::{Protocol, RequestResult};

    fn score(pairs: &[(&str, f64)]) -> RecordScore {
        RecordScore {
            metrics: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_output_is_written_with_pre_and_post_numbers() {
        let requests = vec![
            EditRequest::fact("A is in", "A", "B"),
            EditRequest::fact("C is in", "C", "D"),
        ];
        let pre = vec![
            score(&[("rewrite_acc", 0.0), ("ES", 0.0), ("PS", 0.5), ("NS", 1.0)]),
            score(&[("rewrite_acc", 0.5), ("ES", 0.0), ("PS", 0.0), ("NS", 1.0)]),
        ];
        let post = [
            score(&[("rewrite_acc", 1.0), ("ES", 1.0), ("PS", 1.0), ("NS", 0.5)]),
            score(&[("rewrite_acc", 0.5), ("ES", 1.0), ("PS", 0.0), ("NS", 0.5)]),
        ];
        let run = RunResult {
            results: (0..2)
                .map(|i| RequestResult {
                    index: i,
                    id: i.to_string(),
                    edit_call: i,
                    status: Status::Applied,
                    error: None,
                    edit_seconds: [1.0, 3.0][i],
                    eval_seconds: 0.5,
                    post: Some(post[i].clone()),
                    immediate: None,
                })
                .collect(),
            edit_calls: vec![1.0, 3.0],
            eval_seconds: 1.0,
            seconds: 5.0,
            ..Default::default()
        };
        let options = ProtocolOptions {
            protocol: Protocol::Single,
            batch_size: 1,
            eval_each: false,
        };
        let e = EvalRun {
            settings: json!({"method": "ft", "data": {"offset": 0}}),
            protocol: &options,
            requests: &requests,
            pre: &pre,
            run: &run,
            pre_seconds: 2.0,
            pre_cached: false,
            baseline_file: None,
            model_load_seconds: 0.1,
            total_seconds: 7.0,
        };
        let dir = tempfile::tempdir().unwrap();
        let s = write_all(dir.path(), &e).unwrap();
        let m = &s["metrics"];
        assert_eq!(m["rewrite_acc"]["pre"], 0.25);
        assert_eq!(m["rewrite_acc"]["post"], 0.75);
        // S = hmean(mean ES, mean PS, mean NS): pre has ES 0 → 0; post hmean(1, 0.5, 0.5) = 0.6.
        assert_eq!(m["S"]["pre"], 0.0);
        assert!((m["S"]["post"].as_f64().unwrap() - 0.6).abs() < 1e-12);
        let t = &s["timing"]["edit_seconds"];
        assert_eq!(
            (
                t["median"].as_f64(),
                t["min"].as_f64(),
                t["max"].as_f64(),
                t["total"].as_f64()
            ),
            (Some(2.0), Some(1.0), Some(3.0), Some(4.0))
        );
        for f in [
            "summary.json",
            "records.jsonl",
            "report.md",
            "metrics_vs_edits.png",
            "metrics_vs_edits.svg",
            "edit_time.png",
            "edit_time.svg",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let lines = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2);
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("| rewrite_acc | 0.2500 | 0.7500 |"), "{md}");
        // Report order: rewrite_acc before ES before S.
        let (a, b, c) = (
            md.find("| rewrite_acc").unwrap(),
            md.find("| ES").unwrap(),
            md.find("| S |").unwrap(),
        );
        assert!(a < b && b < c, "{md}");
    }
}

//! `kedit circuit`: knowledge circuits (EAP-IG, docs/circuits.md) of the facts in a data file,
//! found by an analysis plugin's `locate` (method `circuit` of the circuits plugin, or any
//! plugin's method given with --analysis-method that answers the same JSON). Per fact a JSON
//! file, the graph as Graphviz DOT, SVG and PNG; summary.json and summary.md with faithfulness
//! and time per circuit. With `--compare`, each fact is also edited (any method) and analysed
//! again, the edit is rolled back, and the edges that appeared or vanished are written and
//! drawn.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use kedit_plugin_api::{capability, EditRequest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Context, ModelArgs};
use crate::cancel::CancelFlag;
use crate::data::{load_requests, DataFormat, Window};
use crate::editor::{EditProgress, EditorHandle};
use crate::eval::circuit_graph::{nodes_of, prune_dead_nodes, Edge, Node};
use crate::eval::circuit_render::{compare_layout, layout, to_dot};
use crate::eval::graph_image::write_graph;
use crate::hparams::merge_hparams;
use crate::model::ModelHandle;
use crate::plugins::Registry;

#[derive(Args, Debug)]
pub struct CircuitArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Facts to analyse (ROME's known_1000 format, or any format with prompt/subject/answer).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Format of --data (default: detected).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// Stop after N circuits.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Skip the first K records.
    #[arg(long, value_name = "K")]
    pub offset: Option<usize>,
    /// Edges kept before pruning dead nodes.
    #[arg(long, default_value_t = 3000)]
    pub top_n: usize,
    /// Integrated-gradient steps (1: plain EAP).
    #[arg(long, default_value_t = 20)]
    pub ig_steps: usize,
    /// Attention mass from the last token that makes a circuit head a mover or relation head.
    #[arg(long, default_value_t = 0.5)]
    pub role_threshold: f64,
    /// Smallest direct effect of a mover or relation head, as a fraction of the metric's span
    /// (clean − corrupted).
    #[arg(long, default_value_t = 0.03)]
    pub role_min_effect: f64,
    /// The images show the circuit's K strongest edges (the JSON and DOT files keep all).
    #[arg(long, value_name = "K", default_value_t = 250)]
    pub draw_top: usize,
    /// Patch each of the circuit's K strongest edges alone and record the measured metric
    /// change next to its EAP-IG score.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub check_edges: usize,
    /// Also measure faithfulness for circuits of these sizes (top-n before pruning), e.g.
    /// 250,1000,3000,6000.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub curve: Vec<usize>,
    /// Also analyse facts whose clean top token is not the answer.
    #[arg(long)]
    pub include_wrong: bool,
    /// Edit each fact with --method and --target-new, analyse again, and compare.
    #[arg(long, requires = "target_new")]
    pub compare: bool,
    /// Editing method for --compare.
    #[arg(long, default_value = "rome")]
    pub method: String,
    /// The new object for --compare (its first token becomes the answer after the edit).
    #[arg(long)]
    pub target_new: Option<String>,
    /// Hyper-parameters (TOML) of the edit, merged over the config's [hparams].
    #[arg(long, value_name = "FILE")]
    pub hparams: Option<PathBuf>,
    /// The analysis plugin's `locate` method that finds the circuits.
    #[arg(long, value_name = "METHOD", default_value = "circuit")]
    pub analysis_method: String,
    /// Output directory (created; files in it are overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// An analysis plugin and its `locate` method: the editor plugin that offers `method` and has
/// the `locate` capability.
pub fn analyser(registry: &Registry, method: &str) -> Result<(EditorHandle, String)> {
    let (plugin, method) = registry.editor_for_method(method)?;
    if !plugin
        .info
        .capabilities
        .iter()
        .any(|c| c.as_str() == capability::LOCATE)
    {
        bail!(
            "plugin {} (method {method}) cannot analyse: it has no `locate`",
            plugin.name()
        );
    }
    Ok((EditorHandle::new(plugin)?, method))
}

/// Runs `method`'s `locate` on one request and returns its single report.
pub fn locate_one(
    analyser: &mut EditorHandle,
    model: &mut ModelHandle,
    method: &str,
    request: &EditRequest,
    hparams: &Value,
) -> Result<Value> {
    let cancel = CancelFlag::new();
    let text = analyser.locate(
        model,
        method,
        std::slice::from_ref(request),
        &hparams.to_string(),
        &mut EditProgress::new(&cancel, None),
    )?;
    let reports: Vec<Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "record {}: the {method} answer is not a JSON list of reports",
            request.id
        )
    })?;
    reports
        .into_iter()
        .next()
        .with_context(|| format!("record {}: the {method} answer has no report", request.id))
}

#[derive(Deserialize)]
struct RoleView {
    head: Node,
}

/// The fields of a circuit report that kedit summarises and draws; the JSON files keep the
/// whole report.
#[derive(Deserialize)]
struct CircuitView {
    metric_clean: f64,
    metric_corrupt: f64,
    faithfulness: f64,
    normalized_faithfulness: f64,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    mover_heads: Vec<RoleView>,
    relation_heads: Vec<RoleView>,
    seconds: f64,
}

/// A circuit as the plugin reported it, and the view of it kedit draws.
struct Found {
    json: Value,
    view: CircuitView,
}

impl Found {
    fn of(report: &Value, id: &str) -> Result<Self> {
        let json = report["circuit"].clone();
        let view = serde_json::from_value(json.clone())
            .with_context(|| format!("record {id}: the circuit report lacks fields kedit draws"))?;
        Ok(Self { json, view })
    }
}

/// One analysed fact, as summary.json lists it.
#[derive(Serialize)]
struct Row {
    id: String,
    prompt: String,
    answer: String,
    corrupt_subject: String,
    faithfulness: f64,
    normalized_faithfulness: f64,
    metric_clean: f64,
    metric_corrupt: f64,
    edges: usize,
    nodes: usize,
    mover_heads: Vec<String>,
    relation_heads: Vec<String>,
    seconds: f64,
    /// With --check-edges: EAP-IG score vs the patched metric change of the strongest edges.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    edge_checks: Vec<Value>,
    /// With --curve: faithfulness by circuit size.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    faithfulness_curve: Vec<Value>,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn stem_for(index: usize, id: &str) -> String {
    let id: String = id
        .chars()
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

/// The `k` strongest edges of a circuit (edges come sorted by |score|), without the nodes
/// that leaves dangling: what the images show.
fn strongest(edges: &[Edge], k: usize) -> Vec<Edge> {
    prune_dead_nodes(edges.iter().take(k).cloned().collect())
}

/// The circuit's files: `stem.json` (with `extra` merged in), `.dot`, and `.svg`/`.png` of its
/// `draw_top` strongest edges.
fn write_circuit(
    dir: &Path,
    stem: &str,
    title: &str,
    circuit: &Found,
    extra: Value,
    draw_top: usize,
) -> Result<()> {
    let mut value = circuit.json.clone();
    if let (Some(v), Some(e)) = (value.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            v.insert(k.clone(), x.clone());
        }
    }
    write_json(&dir.join(format!("{stem}.json")), &value)?;
    fs::write(
        dir.join(format!("{stem}.dot")),
        to_dot(title, &circuit.view.nodes, &circuit.view.edges),
    )
    .with_context(|| format!("cannot write {stem}.dot"))?;
    let drawn = strongest(&circuit.view.edges, draw_top);
    let title = format!(
        "{title}: strongest {} of {} edges",
        drawn.len(),
        circuit.view.edges.len()
    );
    write_graph(dir, stem, &title, &layout(&nodes_of(&drawn), &drawn))
}

fn names(roles: &[RoleView]) -> Vec<String> {
    roles.iter().map(|r| r.head.to_string()).collect()
}

/// The analysis settings of every circuit, as the hparams of `locate`.
fn settings_of(args: &CircuitArgs) -> Value {
    json!({
        "top_n": args.top_n,
        "ig_steps": args.ig_steps,
        "role_threshold": args.role_threshold,
        "role_min_effect": args.role_min_effect,
    })
}

/// What `--compare` needs: the editing plugin, its method and merged hparams.
struct Editing {
    editor: EditorHandle,
    method: String,
    hparams: String,
    target: String,
}

/// Edits `request` towards the target, has the analyser find the circuit of the same prompt
/// pair (`pair` from the report before) with the new answer and its difference to `before`,
/// rolls the edit back, and writes the comparison.
#[allow(clippy::too_many_arguments)]
fn compare_after_edit(
    model: &mut ModelHandle,
    analysis: (&mut EditorHandle, &str),
    editing: &mut Editing,
    settings: &Value,
    request: &EditRequest,
    pair: &Value,
    before: &Found,
    dir: &Path,
    stem: &str,
    draw_top: usize,
) -> Result<Value> {
    let (analyser, analysis_method) = analysis;
    let (method, target) = (editing.method.as_str(), editing.target.as_str());
    let mut edit = request.clone();
    edit.target_new = target.into();
    let mark = model.journal_mark()?;
    let cancel = CancelFlag::new();
    let started = Instant::now();
    editing.editor.edit(
        model,
        method,
        std::slice::from_ref(&edit),
        &editing.hparams,
        &mut EditProgress::new(&cancel, None),
    )?;
    let edit_seconds = started.elapsed().as_secs_f64();
    let result = (|| -> Result<Value> {
        let mut hparams = settings.clone();
        hparams["pair"] = pair.clone();
        hparams["compare_to"] = before.json.clone();
        let report = locate_one(analyser, model, analysis_method, &edit, &hparams)?;
        let after = Found::of(&report, &request.id)?;
        let title = format!("{} → {} after {method}", request.prompt, target.trim());
        write_circuit(
            dir,
            &format!("{stem}.after"),
            &title,
            &after,
            json!({"edit_target": target}),
            draw_top,
        )?;
        let diff = &report["diff"];
        let count = |key: &str| diff[key].as_array().map_or(0, Vec::len);
        let title = format!(
            "{}: +{} edges (green), −{} edges (grey) after {method}",
            request.prompt,
            count("appeared"),
            count("vanished")
        );
        // The picture compares the strongest edges of each circuit; the JSON has every change.
        let layout = compare_layout(
            &strongest(&before.view.edges, draw_top),
            &strongest(&after.view.edges, draw_top),
        );
        let title = format!("{title}; drawn: the strongest {draw_top} edges of each");
        write_graph(dir, &format!("{stem}.compare"), &title, &layout)?;
        let (b, a) = (&before.view, &after.view);
        let value = json!({
            "method": method,
            "target_new": target,
            "edit_seconds": edit_seconds,
            "before": {"faithfulness": b.faithfulness, "metric_clean": b.metric_clean,
                       "edges": b.edges.len(), "mover_heads": names(&b.mover_heads),
                       "relation_heads": names(&b.relation_heads)},
            "after": {"faithfulness": a.faithfulness, "metric_clean": a.metric_clean,
                      "edges": a.edges.len(), "mover_heads": names(&a.mover_heads),
                      "relation_heads": names(&a.relation_heads)},
            "diff": diff,
        });
        write_json(&dir.join(format!("{stem}.compare.json")), &value)?;
        Ok(value)
    })();
    model.journal_rollback(mark)?;
    result
}

fn list(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

pub fn run(context: &Context, args: CircuitArgs) -> Result<ExitCode> {
    let settings = settings_of(&args);
    let window = Window {
        offset: args.offset.unwrap_or(0),
        limit: None,
    };
    let requests = load_requests(&args.data, args.format.unwrap_or(DataFormat::Auto), window)?;
    if requests.is_empty() {
        bail!("no records in {}", args.data.display());
    }
    let swaps: Vec<String> = requests.iter().map(|r| r.subject.to_string()).collect();
    let registry = context.registry()?;
    let (mut analyser, analysis_method) = analyser(&registry, &args.analysis_method)?;
    let mut editing = None;
    if let (true, Some(target)) = (args.compare, &args.target_new) {
        let (plugin, method) = registry.editor_for_method(&args.method)?;
        editing = Some((EditorHandle::new(plugin)?, method, target.clone()));
    }
    let mut model = context.open_model_with(&registry, &args.model)?;
    let family = model.facts().family.to_string();
    let mut editing = match editing {
        Some((editor, method, target)) => {
            let info = editor
                .method_info(&method)
                .cloned()
                .with_context(|| format!("the editor lost method {method}"))?;
            let hparams = merge_hparams(
                &info,
                &family,
                &context.user_hparams(args.hparams.as_deref())?,
            )?
            .to_string();
            Some(Editing {
                editor,
                method,
                hparams,
                target,
            })
        }
        None => None,
    };
    let out = &args.out;
    let records_dir = out.join("records");
    fs::create_dir_all(&records_dir)
        .with_context(|| format!("cannot create {}", records_dir.display()))?;
    let limit = args.limit.unwrap_or(usize::MAX);
    let started = Instant::now();
    let (mut rows, mut skipped, mut comparisons) = (Vec::new(), Vec::new(), Vec::new());
    for (i, request) in requests.iter().enumerate() {
        if rows.len() >= limit {
            break;
        }
        let stem = stem_for(i + args.offset.unwrap_or(0), &request.id);
        // Swap candidates: the other facts, starting after this one.
        let order: Vec<String> = swaps[i + 1..].iter().chain(&swaps[..i]).cloned().collect();
        let mut hparams = settings.clone();
        hparams["check_edges"] = json!(args.check_edges);
        hparams["curve"] = json!(args.curve);
        hparams["include_wrong"] = json!(args.include_wrong);
        hparams["swaps"] = json!(order);
        let report = locate_one(
            &mut analyser,
            &mut model,
            &analysis_method,
            request,
            &hparams,
        )?;
        match report["outcome"].as_str() {
            Some("found") => {}
            Some("wrong" | "no_swap") => {
                skipped.push(json!({"id": request.id.as_str(), "reason": report["reason"]}));
                continue;
            }
            other => bail!(
                "record {}: the {analysis_method} report has outcome {other:?} (expected found, wrong or no_swap)",
                request.id
            ),
        }
        let circuit = Found::of(&report, &request.id)?;
        let answer = report["answer"].as_str().unwrap_or_default().to_string();
        let (checks, curve) = (
            list(&report["edge_checks"]),
            list(&report["faithfulness_curve"]),
        );
        let extra = json!({
            "edge_checks": &checks,
            "faithfulness_curve": &curve,
            "id": request.id.as_str(),
            "prompt": request.prompt.as_str(),
            "subject": request.subject.as_str(),
            "answer": answer,
            "answer_token": report["answer_token"],
            "foil_token": report["foil_token"],
            "corrupt_prompt": report["corrupt_prompt"],
            "tokens": report["tokens"],
            "subject_range": report["subject_range"],
            "correct": report["correct"],
        });
        let c = &circuit.view;
        let title = format!(
            "{} → {} (faithfulness {:.2})",
            request.prompt, answer, c.faithfulness
        );
        write_circuit(&records_dir, &stem, &title, &circuit, extra, args.draw_top)?;
        eprintln!(
            "{stem}: {} edges, faithfulness {:.3} (normalized {:.3}), {:.1}s",
            c.edges.len(),
            c.faithfulness,
            c.normalized_faithfulness,
            c.seconds
        );
        if let Some(editing) = &mut editing {
            let value = compare_after_edit(
                &mut model,
                (&mut analyser, &analysis_method),
                editing,
                &settings,
                request,
                &report["pair"],
                &circuit,
                &records_dir,
                &stem,
                args.draw_top,
            )?;
            comparisons.push(json!({"id": request.id.as_str(), "compare": value}));
        }
        rows.push(Row {
            id: request.id.to_string(),
            prompt: request.prompt.to_string(),
            answer,
            corrupt_subject: report["corrupt_subject"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            faithfulness: c.faithfulness,
            normalized_faithfulness: c.normalized_faithfulness,
            metric_clean: c.metric_clean,
            metric_corrupt: c.metric_corrupt,
            edges: c.edges.len(),
            nodes: c.nodes.len(),
            mover_heads: names(&c.mover_heads),
            relation_heads: names(&c.relation_heads),
            seconds: c.seconds,
            edge_checks: checks,
            faithfulness_curve: curve,
        });
    }
    if rows.is_empty() {
        bail!(
            "no circuit found: every record was skipped ({} skipped)",
            skipped.len()
        );
    }
    let n = rows.len() as f64;
    let mean = |f: fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / n;
    let summary = json!({
        "model": model.source().display().to_string(),
        "family": family,
        "data": args.data.display().to_string(),
        "settings": settings,
        "circuits": rows.len(),
        "mean_faithfulness": mean(|r| r.faithfulness),
        "mean_normalized_faithfulness": mean(|r| r.normalized_faithfulness),
        "seconds_per_circuit": mean(|r| r.seconds),
        "seconds": started.elapsed().as_secs_f64(),
        "rows": rows,
        "skipped": skipped,
        "comparisons": comparisons,
    });
    write_json(&out.join("summary.json"), &summary)?;
    fs::write(out.join("summary.md"), markdown(&rows, &summary))
        .with_context(|| format!("cannot write {}", out.join("summary.md").display()))?;
    println!("{}", markdown(&rows, &summary));
    Ok(ExitCode::SUCCESS)
}

fn markdown(rows: &[Row], summary: &Value) -> String {
    let mut s = String::from(
        "| id | prompt | answer | swap | edges | faithfulness | normalized | mover heads | relation heads | s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {:.1} |\n",
            r.id,
            r.prompt,
            r.answer,
            r.corrupt_subject,
            r.edges,
            r.faithfulness,
            r.normalized_faithfulness,
            r.mover_heads.join(" "),
            r.relation_heads.join(" "),
            r.seconds
        ));
    }
    s.push_str(&format!(
        "\nMean faithfulness {:.3} (normalized {:.3}) over {} circuits, {:.1} s per circuit.\n",
        summary["mean_faithfulness"].as_f64().unwrap_or(f64::NAN),
        summary["mean_normalized_faithfulness"]
            .as_f64()
            .unwrap_or(f64::NAN),
        rows.len(),
        summary["seconds_per_circuit"].as_f64().unwrap_or(f64::NAN),
    ));
    s
}

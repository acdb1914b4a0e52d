//! `kedit circuit`: knowledge circuits (EAP-IG, docs/circuits.md) of the facts in a data file.
//! Per fact a JSON file, the graph as Graphviz DOT, SVG and PNG; summary.json and summary.md
//! with faithfulness and time per circuit. With `--compare`, each fact is also edited (any
//! method) and analysed again, the edit is rolled back, and the edges that appeared or vanished
//! are written and drawn.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use kedit_circuits::circuit::{check_edges, faithfulness_curve, CurvePoint, EdgeCheck};
use kedit_circuits::graph::{nodes_of, prune_dead_nodes};
use kedit_circuits::prompts::{build_pair, BuiltPair, PairOutcome, TextFact};
use kedit_circuits::render::{compare_layout, layout, to_dot};
use kedit_circuits::{compare, find_circuit, Circuit, CircuitSettings, Edge, Probe};
use kedit_plugin_api::{EditRequest, ModelClient};
use serde::Serialize;
use serde_json::{json, Value};

use super::{Context, ModelArgs};
use crate::cancel::CancelFlag;
use crate::data::{load_requests, DataFormat, Window};
use crate::editor::{EditProgress, EditorHandle};
use crate::eval::graph_image::write_graph;
use crate::hparams::merge_hparams;
use crate::model::ModelHandle;

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
    /// Output directory (created; files in it are overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
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
    edge_checks: Vec<EdgeCheck>,
    /// With --curve: faithfulness by circuit size.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    faithfulness_curve: Vec<CurvePoint>,
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

fn fact_of(r: &EditRequest) -> Result<TextFact> {
    let answer = r
        .ground_truth
        .as_ref()
        .into_option()
        .map(|s| s.to_string())
        .unwrap_or_else(|| r.target_new.to_string());
    if r.subject.is_empty() || answer.trim().is_empty() {
        bail!("record {}: a circuit needs a subject and an answer", r.id);
    }
    Ok(TextFact {
        prompt: r.prompt.to_string(),
        subject: r.subject.to_string(),
        answer,
    })
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
    circuit: &Circuit,
    extra: Value,
    draw_top: usize,
) -> Result<()> {
    let mut value = serde_json::to_value(circuit)?;
    if let (Some(v), Some(e)) = (value.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            v.insert(k.clone(), x.clone());
        }
    }
    write_json(&dir.join(format!("{stem}.json")), &value)?;
    fs::write(
        dir.join(format!("{stem}.dot")),
        to_dot(title, &circuit.nodes, &circuit.edges),
    )
    .with_context(|| format!("cannot write {stem}.dot"))?;
    let drawn = strongest(&circuit.edges, draw_top);
    let title = format!(
        "{title}: strongest {} of {} edges",
        drawn.len(),
        circuit.edges.len()
    );
    write_graph(dir, stem, &title, &layout(&nodes_of(&drawn), &drawn))
}

fn tokens_of(client: &ModelClient<'_>, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&t| {
            client
                .detokenize(&[t], false)
                .unwrap_or_else(|_| format!("<{t}>"))
        })
        .collect()
}

fn names(roles: &[kedit_circuits::HeadRole]) -> Vec<String> {
    roles.iter().map(|r| r.head.to_string()).collect()
}

/// Edits `request` towards `target`, finds the circuit of the same pair with the new answer,
/// rolls the edit back, and writes the comparison.
#[allow(clippy::too_many_arguments)]
fn compare_after_edit(
    model: &mut ModelHandle,
    editor: &mut EditorHandle,
    method: &str,
    hparams: &str,
    request: &EditRequest,
    target: &str,
    built: &BuiltPair,
    before: &Circuit,
    settings: &CircuitSettings,
    dir: &Path,
    stem: &str,
    draw_top: usize,
) -> Result<Value> {
    let mut edit = request.clone();
    edit.target_new = target.into();
    let mark = model.journal_mark()?;
    let cancel = CancelFlag::new();
    let started = Instant::now();
    editor.edit(
        model,
        method,
        &[edit],
        hparams,
        &mut EditProgress::new(&cancel, None),
    )?;
    let edit_seconds = started.elapsed().as_secs_f64();
    let result = (|| -> Result<Value> {
        let client = ModelClient::new(model.as_abi_mut());
        let probe = Probe::new(&client)?;
        let mut pair = built.pair.clone();
        let prompt_ids = pair.clean.clone();
        pair.answer =
            kedit_circuits::prompts::answer_token(&client, &prompt_ids, &request.prompt, target)?;
        if pair.foil == pair.answer {
            pair.foil = built.pair.answer;
        }
        let after = find_circuit(&probe, &pair, settings)?;
        let title = format!("{} → {} after {method}", request.prompt, target.trim());
        write_circuit(
            dir,
            &format!("{stem}.after"),
            &title,
            &after,
            json!({"edit_target": target}),
            draw_top,
        )?;
        let diff = compare(before, &after);
        let title = format!(
            "{}: +{} edges (green), −{} edges (grey) after {method}",
            request.prompt,
            diff.appeared.len(),
            diff.vanished.len()
        );
        // The picture compares the strongest edges of each circuit; the JSON has every change.
        let layout = compare_layout(
            &strongest(&before.edges, draw_top),
            &strongest(&after.edges, draw_top),
        );
        let title = format!("{title}; drawn: the strongest {draw_top} edges of each");
        write_graph(dir, &format!("{stem}.compare"), &title, &layout)?;
        let value = json!({
            "method": method,
            "target_new": target,
            "edit_seconds": edit_seconds,
            "before": {"faithfulness": before.faithfulness, "metric_clean": before.metric_clean,
                       "edges": before.edges.len(), "mover_heads": names(&before.mover_heads),
                       "relation_heads": names(&before.relation_heads)},
            "after": {"faithfulness": after.faithfulness, "metric_clean": after.metric_clean,
                      "edges": after.edges.len(), "mover_heads": names(&after.mover_heads),
                      "relation_heads": names(&after.relation_heads)},
            "diff": diff,
        });
        write_json(&dir.join(format!("{stem}.compare.json")), &value)?;
        Ok(value)
    })();
    model.journal_rollback(mark)?;
    result
}

pub fn run(context: &Context, args: CircuitArgs) -> Result<ExitCode> {
    let settings = CircuitSettings {
        top_n: args.top_n,
        ig_steps: args.ig_steps,
        role_threshold: args.role_threshold,
        role_min_effect: args.role_min_effect,
    };
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
    let mut editor = None;
    if args.compare {
        let (plugin, method) = registry.editor_for_method(&args.method)?;
        let handle = EditorHandle::new(plugin)?;
        editor = Some((handle, method));
    }
    let mut model = context.open_model_with(&registry, &args.model)?;
    let family = model.facts().family.to_string();
    let hparams = match &mut editor {
        Some((handle, method)) => {
            let info = handle
                .method_info(method)
                .cloned()
                .with_context(|| format!("the editor lost method {method}"))?;
            merge_hparams(
                &info,
                &family,
                &context.user_hparams(args.hparams.as_deref())?,
            )?
            .to_string()
        }
        None => String::new(),
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
        let fact = fact_of(request)?;
        let stem = stem_for(i + args.offset.unwrap_or(0), &request.id);
        let (built, circuit, extra, checks, curve) = {
            let client = ModelClient::new(model.as_abi_mut());
            // Swap candidates: the other facts, starting after this one.
            let order: Vec<String> = swaps[i + 1..].iter().chain(&swaps[..i]).cloned().collect();
            let built = match build_pair(&client, &fact, &order, !args.include_wrong)? {
                PairOutcome::Built(built) => built,
                PairOutcome::Wrong => {
                    skipped.push(json!({"id": request.id.as_str(), "reason": "the model's top token is not the answer"}));
                    continue;
                }
                PairOutcome::NoSwap => {
                    skipped.push(json!({"id": request.id.as_str(), "reason": "no subject of the same token length that changes the prediction"}));
                    continue;
                }
            };
            let probe = Probe::new(&client)?;
            let circuit = find_circuit(&probe, &built.pair, &settings)?;
            let k = args.check_edges.min(circuit.edges.len());
            let checks = check_edges(&probe, &built.pair, &circuit.edges[..k])?;
            let curve = if args.curve.is_empty() {
                Vec::new()
            } else {
                faithfulness_curve(&probe, &built.pair, &args.curve, settings.ig_steps)?
            };
            let extra = json!({
                "edge_checks": &checks,
                "faithfulness_curve": &curve,
                "id": request.id.as_str(),
                "prompt": fact.prompt,
                "subject": fact.subject,
                "answer": fact.answer,
                "answer_token": tokens_of(&client, &[built.pair.answer]),
                "foil_token": tokens_of(&client, &[built.pair.foil]),
                "corrupt_prompt": built.corrupt_prompt,
                "tokens": tokens_of(&client, &built.pair.clean),
                "subject_range": [built.pair.subject.start, built.pair.subject.end],
                "correct": built.correct,
            });
            (built, circuit, extra, checks, curve)
        };
        let title = format!(
            "{} → {} (faithfulness {:.2})",
            fact.prompt, fact.answer, circuit.faithfulness
        );
        write_circuit(&records_dir, &stem, &title, &circuit, extra, args.draw_top)?;
        eprintln!(
            "{stem}: {} edges, faithfulness {:.3} (normalized {:.3}), {:.1}s",
            circuit.edges.len(),
            circuit.faithfulness,
            circuit.normalized_faithfulness,
            circuit.seconds
        );
        if let (Some((handle, method)), Some(target)) = (&mut editor, &args.target_new) {
            let value = compare_after_edit(
                &mut model,
                handle,
                method,
                &hparams,
                request,
                target,
                &built,
                &circuit,
                &settings,
                &records_dir,
                &stem,
                args.draw_top,
            )?;
            comparisons.push(json!({"id": request.id.as_str(), "compare": value}));
        }
        rows.push(Row {
            id: request.id.to_string(),
            prompt: fact.prompt.clone(),
            answer: fact.answer.clone(),
            corrupt_subject: built.corrupt_subject.clone(),
            faithfulness: circuit.faithfulness,
            normalized_faithfulness: circuit.normalized_faithfulness,
            metric_clean: circuit.metric_clean,
            metric_corrupt: circuit.metric_corrupt,
            edges: circuit.edges.len(),
            nodes: circuit.nodes.len(),
            mover_heads: names(&circuit.mover_heads),
            relation_heads: names(&circuit.relation_heads),
            seconds: circuit.seconds,
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

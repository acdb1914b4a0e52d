//! One knowledge circuit: score every edge with EAP-IG, keep the top n, prune dead nodes,
//! measure faithfulness, and name the mover and relation heads.

use std::collections::BTreeSet;
use std::time::Instant;

use kedit_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

use crate::eap::{self, PairRuns, PromptPair};
use crate::graph::{self, Edge, Node};
use crate::probe::{dot, Probe};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitSettings {
    /// Edges kept before pruning dead nodes (KnowledgeCircuits' `apply_topn`).
    pub top_n: usize,
    /// Interpolation points of the integrated gradients (1: plain EAP at the clean prompt).
    pub ig_steps: usize,
    /// Attention mass from the last token that makes a head a mover (on the subject) or a
    /// relation head (on the relation tokens).
    pub role_threshold: f64,
    /// Smallest direct effect of a mover or relation head, as a fraction of the metric's span
    /// `metric_clean − metric_corrupt`.
    pub role_min_effect: f64,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        Self {
            top_n: 3000,
            ig_steps: 20,
            role_threshold: 0.5,
            role_min_effect: 0.03,
        }
    }
}

/// A head named for its role, with the evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadRole {
    pub head: Node,
    /// Attention mass from the last token on the subject (movers) or relation tokens.
    pub attention: f64,
    /// Direct effect on the metric: the head's clean output at the last position times the
    /// metric's (integrated) gradient at the logits' input (positive: it pushes the answer).
    pub direct_effect: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Circuit {
    pub metric: String,
    pub metric_clean: f64,
    pub metric_corrupt: f64,
    /// The clean prompt's metric with every edge outside the circuit patched to its corrupted
    /// activation.
    pub metric_circuit: f64,
    /// `metric_circuit / metric_clean`.
    pub faithfulness: f64,
    /// `(metric_circuit − metric_corrupt) / (metric_clean − metric_corrupt)`.
    pub normalized_faithfulness: f64,
    pub faithfulness_passes: usize,
    pub edges_total: usize,
    pub edges_kept_before_pruning: usize,
    pub nodes: Vec<Node>,
    /// Kept edges, largest |score| first.
    pub edges: Vec<Edge>,
    pub mover_heads: Vec<HeadRole>,
    pub relation_heads: Vec<HeadRole>,
    /// See [`PairRuns::additivity_error`]; edge scores assume it is 0.
    pub additivity_error: f64,
    pub settings: CircuitSettings,
    pub seconds: f64,
    /// Where the time went: clean and corrupted runs, EAP-IG gradients, edge scores,
    /// faithfulness passes.
    pub seconds_by_step: Timings,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    pub runs: f64,
    pub gradients: f64,
    pub scores: f64,
    pub faithfulness: f64,
}

/// Finds the circuit of one prompt pair.
pub fn find_circuit(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    settings: &CircuitSettings,
) -> Result<Circuit, PluginError> {
    let start = Instant::now();
    let facts = probe.client.facts()?;
    pair.check(facts.vocab_size as usize)?;
    if settings.top_n == 0 {
        return Err(PluginError::invalid("top_n must be at least 1"));
    }
    let mut timings = Timings::default();
    let mut lap = Instant::now();
    let mut split = || {
        let t = lap.elapsed().as_secs_f64();
        lap = Instant::now();
        t
    };
    let runs = PairRuns::new(probe, pair)?;
    timings.runs = split();
    let differences = runs.differences();
    let gradients = eap::input_gradients(probe, pair, &runs, settings.ig_steps)?;
    timings.gradients = split();
    let all = eap::score_edges(probe, &differences, &gradients);
    let top = graph::top_n(&all, settings.top_n);
    let mut edges = graph::prune_dead_nodes(top);
    edges.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
    timings.scores = split();
    let (metric_circuit, passes) = eap::circuit_metric(probe, pair, &runs, &edges)?;
    timings.faithfulness = split();
    let nodes = graph::nodes_of(&edges);
    let (mover_heads, relation_heads) =
        head_roles(probe, pair, &runs, &gradients, &nodes, settings);
    let span = runs.metric_clean - runs.metric_corrupt;
    Ok(Circuit {
        metric: "logit(answer) - logit(foil) at the last token".into(),
        metric_clean: runs.metric_clean,
        metric_corrupt: runs.metric_corrupt,
        metric_circuit,
        faithfulness: metric_circuit / runs.metric_clean,
        normalized_faithfulness: (metric_circuit - runs.metric_corrupt) / span,
        faithfulness_passes: passes,
        edges_total: all.len(),
        edges_kept_before_pruning: settings.top_n.min(all.len()),
        nodes,
        edges,
        mover_heads,
        relation_heads,
        additivity_error: runs.additivity_error(),
        settings: settings.clone(),
        seconds: start.elapsed().as_secs_f64(),
        seconds_by_step: timings,
    })
}

/// Mover heads: circuit heads whose attention from the last token puts at least
/// `role_threshold` of its mass on the subject's tokens. Relation heads: circuit heads that put
/// at least that mass on the relation tokens (after the subject, before the last token). Both
/// must also push the answer directly (positive direct effect). Sorted by attention mass.
fn head_roles(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    runs: &PairRuns,
    gradients: &crate::probe::NodeVectors,
    circuit: &[Node],
    settings: &CircuitSettings,
) -> (Vec<HeadRole>, Vec<HeadRole>) {
    let s = probe.shape;
    let seq = pair.clean.len();
    let last = seq - 1;
    let d = s.d_model;
    let probs = runs
        .clean
        .attn_probs
        .as_ref()
        .expect("the clean run captures attention");
    let relation: BTreeSet<usize> = (pair.subject.end..last).collect();
    let logit_grad = &gradients[&Node::Logits][last * d..(last + 1) * d];
    let min_effect = settings.role_min_effect * (runs.metric_clean - runs.metric_corrupt).abs();
    let (mut movers, mut relations) = (Vec::new(), Vec::new());
    for &node in circuit {
        let Node::Head { layer, head } = node else {
            continue;
        };
        let row = &probs[layer][last * s.n_heads * seq + head * seq..][..seq];
        let on = |set: &mut dyn Iterator<Item = usize>| set.map(|j| row[j] as f64).sum::<f64>();
        let subject_mass = on(&mut pair.subject.clone());
        let relation_mass = on(&mut relation.iter().copied());
        let out = &runs.clean.outputs[&node][last * d..(last + 1) * d];
        let direct_effect = dot(out, logit_grad);
        if subject_mass >= settings.role_threshold && direct_effect >= min_effect {
            movers.push(HeadRole {
                head: node,
                attention: subject_mass,
                direct_effect,
            });
        }
        if relation_mass >= settings.role_threshold && direct_effect >= min_effect {
            relations.push(HeadRole {
                head: node,
                attention: relation_mass,
                direct_effect,
            });
        }
    }
    movers.sort_by(|a, b| b.attention.total_cmp(&a.attention));
    relations.sort_by(|a, b| b.attention.total_cmp(&a.attention));
    (movers, relations)
}

/// Edges of `after` that `before` lacks (appeared) and the reverse (vanished).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CircuitDiff {
    pub appeared: Vec<Edge>,
    pub vanished: Vec<Edge>,
    pub kept_in_both: usize,
    pub nodes_appeared: Vec<Node>,
    pub nodes_vanished: Vec<Node>,
}

pub fn compare(before: &Circuit, after: &Circuit) -> CircuitDiff {
    let b = graph::by_pair(&before.edges);
    let a = graph::by_pair(&after.edges);
    let appeared: Vec<Edge> = after
        .edges
        .iter()
        .filter(|e| !b.contains_key(&(e.from, e.to)))
        .cloned()
        .collect();
    let vanished: Vec<Edge> = before
        .edges
        .iter()
        .filter(|e| !a.contains_key(&(e.from, e.to)))
        .cloned()
        .collect();
    let bn: BTreeSet<Node> = before.nodes.iter().copied().collect();
    let an: BTreeSet<Node> = after.nodes.iter().copied().collect();
    CircuitDiff {
        kept_in_both: after.edges.len() - appeared.len(),
        appeared,
        vanished,
        nodes_appeared: an.difference(&bn).copied().collect(),
        nodes_vanished: bn.difference(&an).copied().collect(),
    }
}

/// An edge's EAP-IG score next to the metric change measured by patching that edge alone to
/// its corrupted activation (the quantity the score estimates).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EdgeCheck {
    pub from: Node,
    pub to: Node,
    pub score: f64,
    pub patched: f64,
}

/// Patches each of `edges` alone, fully (scale 1), on the clean prompt.
pub fn check_edges(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    edges: &[Edge],
) -> Result<Vec<EdgeCheck>, PluginError> {
    let runs = PairRuns::new(probe, pair)?;
    edges
        .iter()
        .map(|e| {
            Ok(EdgeCheck {
                from: e.from,
                to: e.to,
                score: e.score,
                patched: eap::patch_edge(probe, pair, &runs, e.from, e.to, 1.0)?,
            })
        })
        .collect()
}

/// The faithfulness of the circuit of the top `top_n` edges (after pruning).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurvePoint {
    pub top_n: usize,
    pub edges: usize,
    pub metric_circuit: f64,
    pub faithfulness: f64,
    pub normalized_faithfulness: f64,
}

/// Faithfulness as the circuit grows: one point per size in `sizes`.
pub fn faithfulness_curve(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    sizes: &[usize],
    ig_steps: usize,
) -> Result<Vec<CurvePoint>, PluginError> {
    let runs = PairRuns::new(probe, pair)?;
    let gradients = eap::input_gradients(probe, pair, &runs, ig_steps)?;
    let all = eap::score_edges(probe, &runs.differences(), &gradients);
    let span = runs.metric_clean - runs.metric_corrupt;
    sizes
        .iter()
        .map(|&n| {
            let edges = graph::prune_dead_nodes(graph::top_n(&all, n));
            let (m, _) = eap::circuit_metric(probe, pair, &runs, &edges)?;
            Ok(CurvePoint {
                top_n: n,
                edges: edges.len(),
                metric_circuit: m,
                faithfulness: m / runs.metric_clean,
                normalized_faithfulness: (m - runs.metric_corrupt) / span,
            })
        })
        .collect()
}

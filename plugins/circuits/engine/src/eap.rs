//! Edge attribution patching with integrated gradients (EAP-IG, Hanna et al. 2024, as
//! KnowledgeCircuits' `eap/attribute.py` uses it).
//!
//! The metric is the logit difference `M = logit(answer) − logit(foil)` at the last position,
//! where the answer is the fact's object and the foil the corrupted prompt's answer (computed as
//! `log p(answer) − log p(foil)`, which is the same number). For an edge u → v:
//!
//! ```text
//! score(u → v) = Σ_pos (a_u^corrupt − a_u^clean) · (1/m) Σ_{k=1..m} ∂M/∂in_v |_{e_k}
//! e_k = e_corrupt + (k/m)·(e_clean − e_corrupt)
//! ```
//!
//! with `in_v` node v's own input (the residual stream as v alone sees it) and `e` the input
//! embeddings. `m = 1` is plain EAP: the gradient at the clean prompt. The score estimates
//! how much the metric changes when the edge alone carries the corrupted activation, so an edge
//! the fact depends on has a negative score; edges are ranked by |score|.

use std::collections::HashMap;
use std::ops::Range;

use kedit_plugin_api::{
    Batch, ForwardRequest, GradRequest, Intervention, InterventionMode, LogitsWanted, NllTerm,
    Padding, PluginError, Tensor,
};
use serde::{Deserialize, Serialize};

use crate::graph::{self, Edge, Node};
use crate::probe::{dot, sub, NodeVectors, Probe, Run};

/// A clean prompt and its corruption (the subject swapped for one of the same token length).
/// Serialised so that the host can hand the pair back for the analysis after an edit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptPair {
    pub clean: Vec<u32>,
    pub corrupt: Vec<u32>,
    /// Token positions of the subject (the same in both prompts).
    pub subject: Range<usize>,
    /// The clean answer's first token.
    pub answer: u32,
    /// The corrupted prompt's answer (a token other than `answer`).
    pub foil: u32,
}

impl PromptPair {
    pub fn check(&self, vocab: usize) -> Result<(), PluginError> {
        let bad = |m: String| Err(PluginError::invalid(format!("prompt pair: {m}")));
        if self.clean.is_empty() || self.clean.len() != self.corrupt.len() {
            return bad(format!(
                "clean and corrupted prompts must have the same, non-zero token length ({} vs {})",
                self.clean.len(),
                self.corrupt.len()
            ));
        }
        if self.subject.is_empty() || self.subject.end > self.clean.len() {
            return bad(format!(
                "subject tokens {:?} are not inside the prompt of {} tokens",
                self.subject,
                self.clean.len()
            ));
        }
        if self.answer == self.foil {
            return bad(format!(
                "answer and foil are the same token {}",
                self.answer
            ));
        }
        for t in [self.answer, self.foil] {
            if t as usize >= vocab {
                return bad(format!("token {t} is outside the vocabulary of {vocab}"));
            }
        }
        Ok(())
    }

    /// `logit(answer) − logit(foil)` from last-position logits.
    pub fn metric(&self, last_logits: &[f32]) -> f64 {
        last_logits[self.answer as usize] as f64 - last_logits[self.foil as usize] as f64
    }
}

/// The clean and corrupted runs of a pair.
pub struct PairRuns {
    pub clean: Run,
    pub corrupt: Run,
    pub metric_clean: f64,
    pub metric_corrupt: f64,
}

impl PairRuns {
    pub fn new(probe: &Probe<'_, '_>, pair: &PromptPair) -> Result<Self, PluginError> {
        let clean = probe.run(&pair.clean, &NodeVectors::new(), true)?;
        let corrupt = probe.run(&pair.corrupt, &NodeVectors::new(), false)?;
        Ok(Self {
            metric_clean: pair.metric(&clean.last_logits),
            metric_corrupt: pair.metric(&corrupt.last_logits),
            clean,
            corrupt,
        })
    }

    /// `a_u^corrupt − a_u^clean` for every source node.
    pub fn differences(&self) -> NodeVectors {
        self.clean
            .outputs
            .iter()
            .map(|(n, clean)| (*n, sub(&self.corrupt.outputs[n], clean)))
            .collect()
    }

    /// How far the residual stream entering the final norm is from the sum of the node
    /// outputs, as a fraction of the clean-vs-corrupt difference: 0 when every node writes
    /// straight into the residual stream (the premise of edge patching); not 0 for families
    /// that normalise block outputs before adding them (GLM-4's sandwich norms).
    pub fn additivity_error(&self) -> f64 {
        let diff = sub(&self.corrupt.resid_final, &self.clean.resid_final);
        let mut sum = vec![0f32; diff.len()];
        for d in self.differences().values() {
            for (s, x) in sum.iter_mut().zip(d) {
                *s += x;
            }
        }
        let err = sub(&diff, &sum);
        let n = dot(&diff, &diff).sqrt();
        if n == 0.0 {
            return 0.0;
        }
        dot(&err, &err).sqrt() / n
    }
}

/// `(1/m) Σ_k ∂M/∂in_v` at the interpolated embeddings, for every target node, `[seq, d]`.
pub fn input_gradients(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    runs: &PairRuns,
    steps: usize,
) -> Result<NodeVectors, PluginError> {
    if steps == 0 {
        return Err(PluginError::invalid("EAP-IG needs at least one step"));
    }
    let s = probe.shape;
    let (seq, d) = (pair.clean.len(), s.d_model);
    let e_diff = sub(
        &runs.clean.outputs[&Node::Input],
        &runs.corrupt.outputs[&Node::Input],
    );
    let batch = Batch::new(vec![pair.corrupt.clone(); steps], Padding::Right);
    let mut forward = ForwardRequest::new(batch, LogitsWanted::None);
    // One parameter per (input site, position), shared by every row: its gradient sums the
    // rows' gradients.
    let mut sites: Vec<(String, usize)> = Vec::new();
    for l in 0..s.n_layers {
        sites.push((format!("layer.{l}.head_in"), s.n_heads * d));
        sites.push((format!("layer.{l}.mlp_in"), d));
    }
    sites.push((format!("layer.{}.resid_post", s.n_layers - 1), d));
    let mut interventions = Vec::new();
    let mut params = Vec::new();
    for (site, width) in &sites {
        for p in 0..seq {
            let param = params.len();
            params.push(Tensor::zeros(&[*width]));
            for row in 0..steps {
                interventions.push(Intervention::add_param(site, row, p, param));
            }
        }
    }
    for row in 0..steps {
        let alpha = (row + 1) as f32 / steps as f32;
        for p in 0..seq {
            let v: Vec<f32> = e_diff[p * d..(p + 1) * d]
                .iter()
                .map(|x| alpha * x)
                .collect();
            if v.iter().any(|&x| x != 0.0) {
                interventions.push(Intervention::fixed(
                    "embed",
                    row,
                    p,
                    InterventionMode::Add,
                    Tensor::vector(v),
                ));
            }
        }
    }
    forward.interventions = interventions.into();
    forward.params = params.into();
    let last = seq - 1;
    // loss = Σ_rows (log p(answer) − log p(foil)) = Σ_rows M: NLL terms with weights −1 and +1.
    let mut nll = Vec::new();
    for row in 0..steps {
        nll.push(NllTerm {
            row: row as u32,
            position: last as u32,
            token: pair.answer,
            weight: -1.0,
        });
        nll.push(NllTerm {
            row: row as u32,
            position: last as u32,
            token: pair.foil,
            weight: 1.0,
        });
    }
    let out = probe.client.gradient(&GradRequest {
        forward,
        nll: nll.into(),
        kl: Default::default(),
        site_grads: Default::default(),
        prepared: Default::default(),
    })?;
    let grads = out.param_grads;
    let scale = 1.0 / steps as f32;
    let mut result = NodeVectors::new();
    for target in probe.targets() {
        let (site, offset, width) = probe.input_site(target);
        let k = sites
            .iter()
            .position(|(s, _)| *s == site)
            .expect("every input site has params");
        let mut g = vec![0f32; seq * d];
        for p in 0..seq {
            let src = &grads[k * seq + p].as_slice()[offset..offset + d];
            debug_assert_eq!(grads[k * seq + p].numel(), width);
            for (dst, x) in g[p * d..(p + 1) * d].iter_mut().zip(src) {
                *dst = x * scale;
            }
        }
        result.insert(target, g);
    }
    Ok(result)
}

/// Scores every edge of the full graph.
pub fn score_edges(
    probe: &Probe<'_, '_>,
    differences: &NodeVectors,
    gradients: &NodeVectors,
) -> Vec<Edge> {
    let s = probe.shape;
    graph::all_edges(s.n_layers, s.n_heads)
        .into_iter()
        .map(|(from, to)| Edge {
            from,
            to,
            score: dot(&differences[&from], &gradients[&to]),
        })
        .collect()
}

/// The metric's change, divided by `scale`, when node `to` alone sees `scale` times the
/// corrupted-minus-clean activation of `from` (a direct measurement of one edge).
pub fn patch_edge(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    runs: &PairRuns,
    from: Node,
    to: Node,
    scale: f32,
) -> Result<f64, PluginError> {
    let diff: Vec<f32> = sub(&runs.corrupt.outputs[&from], &runs.clean.outputs[&from])
        .into_iter()
        .map(|x| x * scale)
        .collect();
    let deltas: NodeVectors = [(to, diff)].into_iter().collect();
    let run = probe.run(&pair.clean, &deltas, false)?;
    Ok((pair.metric(&run.last_logits) - runs.metric_clean) / scale as f64)
}

/// The metric of the clean prompt when every edge outside `kept` carries the corrupted
/// activation of its source (KnowledgeCircuits / EAP evaluation), and how many passes that
/// took. Each node's input gets Σ over its pruned incoming edges of (a_u^corrupt − a_u), with
/// a_u the source's activation in this same patched run; the corrections are refined pass by
/// pass until they stop changing. Each pass makes one more level of the residual order exact
/// (the heads of layer 0, then its MLP, then the heads of layer 1, ...), so 2·L + 2 passes
/// always suffice.
pub fn circuit_metric(
    probe: &Probe<'_, '_>,
    pair: &PromptPair,
    runs: &PairRuns,
    kept: &[Edge],
) -> Result<(f64, usize), PluginError> {
    let kept = graph::by_pair(kept);
    let s = probe.shape;
    let edges = graph::all_edges(s.n_layers, s.n_heads);
    let mut pruned_into: HashMap<Node, Vec<Node>> = HashMap::new();
    for (from, to) in edges {
        if !kept.contains_key(&(from, to)) {
            pruned_into.entry(to).or_default().push(from);
        }
    }
    let mut current: NodeVectors = runs.clean.outputs.clone();
    let mut metric = runs.metric_clean;
    let max_passes = 2 * s.n_layers + 3;
    for pass in 1..=max_passes {
        let mut deltas = NodeVectors::new();
        for (to, froms) in &pruned_into {
            let mut acc = vec![0f32; current[&Node::Input].len()];
            for from in froms {
                for ((a, c), x) in acc
                    .iter_mut()
                    .zip(&runs.corrupt.outputs[from])
                    .zip(&current[from])
                {
                    *a += c - x;
                }
            }
            deltas.insert(*to, acc);
        }
        let run = probe.run(&pair.clean, &deltas, false)?;
        metric = pair.metric(&run.last_logits);
        let change = run
            .outputs
            .iter()
            .map(|(n, v)| {
                v.iter()
                    .zip(&current[n])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            })
            .fold(0f32, f32::max);
        let scale = run
            .outputs
            .values()
            .flat_map(|v| v.iter())
            .map(|x| x.abs())
            .fold(0f32, f32::max)
            .max(1e-12);
        current = run.outputs;
        if change <= 1e-5 * scale {
            return Ok((metric, pass));
        }
    }
    Ok((metric, max_passes))
}

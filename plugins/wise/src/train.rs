//! One WISE edit, as EasyEdit's `WISE.edit` runs it: the edit expanded over the context
//! templates plus one irrelevant (loc) row, the label-masked NLL plus the three-part routing
//! margin, SGD on the side memory with the shard's gradient mask, and the clamp around W.
//! The model computes the NLL gradient at the side memory's output (`site_grads`); the margin
//! depends only on that layer's input and the side memory, so its gradient is formed here.

use std::sync::Arc;

use kedit_plugin_api::{
    Batch, ChatMessage, EditRequest, ForwardRequest, GenerateRequest, GradRequest, LogitsWanted,
    ModelClient, ModelFacts, NllTerm, Padding, PluginError, ProgressMut,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::hparams::{Objective, ThresholdFrom, WiseHparams};
use crate::merge::merge;
use crate::module::{LogEntry, MeanAct, Memory, Snapshot, TrainCell};
use crate::score::{self, gt_x, Matrix};

const IGNORE: i64 = -100;

/// The training rows of one edit.
#[derive(Clone, Debug, Serialize)]
pub struct EditBatch {
    #[serde(skip)]
    pub batch: Batch,
    #[serde(skip)]
    pub terms: Vec<NllTerm>,
    /// Rows holding the edit (all but the last, the loc row).
    pub edit_rows: usize,
    /// The row of the bare `{}` template (the edit's own `prompt target`), if there is one.
    pub bare_row: Option<usize>,
    /// EasyEdit's `labels`, `[rows, padded_len]`, −100 where unlabelled.
    pub labels: Vec<Vec<i64>>,
}

/// EasyEdit's `wise/utils.tokenize` for one request, with left padding.
pub fn build_batch(
    model: &ModelClient<'_>,
    facts: &ModelFacts,
    request: &EditRequest,
    templates: &[String],
    irrelevant: Option<&str>,
    hp: &WiseHparams,
) -> Result<EditBatch, PluginError> {
    let who = || format!("wise: request '{}'", request.id);
    let loc_text = match irrelevant {
        Some(text) => text.to_string(),
        None => {
            let loc = request.locality.first().ok_or_else(|| {
                PluginError::invalid(format!(
                    "{}: WISE needs an irrelevant prompt for its routing loss: give \
                     `irrelevant_prompts` or a request with a locality prompt",
                    who()
                ))
            })?;
            if loc.answer.is_empty() {
                loc.prompt.to_string()
            } else {
                format!("{} {}", loc.prompt, loc.answer)
            }
        }
    };
    let (prompt, target) = (request.prompt.as_str(), request.target_new.as_str());
    if prompt.is_empty() || target.is_empty() {
        return Err(PluginError::invalid(format!(
            "{}: empty prompt or target",
            who()
        )));
    }
    let fill = |t: &str, text: &str| t.replacen("{}", text, 1);
    let chat = |text: String| -> Result<String, PluginError> {
        model.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: text.into(),
            }],
            true,
        )
    };
    let mut full_texts = Vec::new();
    let mut prompt_texts = Vec::new();
    for t in templates {
        if hp.use_chat_template {
            let p = chat(fill(t, prompt))?;
            full_texts.push(format!("{p} {target}"));
            prompt_texts.push(p);
        } else {
            full_texts.push(fill(t, &format!("{prompt} {target}")));
            prompt_texts.push(fill(t, prompt));
        }
    }
    full_texts.push(loc_text);
    // EasyEdit counts prompt tokens in a padded batch, so every row masks the longest prompt.
    let mut prompt_len = 0;
    for p in &prompt_texts {
        prompt_len = prompt_len.max(model.tokenize(p, true)?.len());
    }
    let rows: Vec<Vec<u32>> = full_texts
        .iter()
        .map(|t| model.tokenize(t, true))
        .collect::<Result<_, _>>()?;
    if let Some(i) = rows.iter().position(|r| r.is_empty()) {
        return Err(PluginError::invalid(format!(
            "{}: training row {i} has no tokens",
            who()
        )));
    }
    let batch = Batch::new(rows, Padding::Left);
    let pad = facts
        .pad_id
        .into_option()
        .or_else(|| facts.eos_ids.first().copied())
        .unwrap_or(0);
    let seq = batch.padded_len();
    let edit_rows = templates.len();
    let mut labels = Vec::with_capacity(batch.rows.len());
    for r in 0..batch.rows.len() {
        let off = batch.offset(r);
        let row: Vec<i64> = (0..seq)
            .map(|p| {
                if p < off {
                    return IGNORE;
                }
                let id = batch.rows[r][p - off];
                let prompt_masked = r < edit_rows
                    && hp.objective_optimization == Objective::OnlyLabel
                    && p < prompt_len;
                if prompt_masked || id == pad {
                    IGNORE
                } else {
                    id as i64
                }
            })
            .collect();
        labels.push(row);
    }
    let mut terms = Vec::new();
    for (r, row) in labels.iter().enumerate().take(edit_rows) {
        // EasyEdit's `__cal_ft_loss`: the averaging mask starts at `col − 1` (a Python index,
        // so −1 means the last position) of the shifted sequence, one unlabelled slot included.
        let col = row.iter().filter(|&&l| l == IGNORE).count() as i64 - 1;
        let shifted = (seq - 1) as i64;
        let mut start = col - 1;
        if start < 0 {
            start = (start + shifted).max(0);
        }
        let den = shifted - start;
        if den <= 0 {
            return Err(PluginError::invalid(format!(
                "{}: row {r} has no label to learn",
                who()
            )));
        }
        let w = 1.0 / (den as f32 * edit_rows as f32);
        for j in start as usize..seq - 1 {
            if row[j + 1] != IGNORE {
                terms.push(NllTerm {
                    row: r as u32,
                    position: j as u32,
                    token: row[j + 1] as u32,
                    weight: w,
                });
            }
        }
    }
    if terms.is_empty() {
        return Err(PluginError::invalid(format!(
            "{}: no target token is labelled (is the prompt longer than the rows?)",
            who()
        )));
    }
    Ok(EditBatch {
        batch,
        terms,
        edit_rows,
        bare_row: templates.iter().position(|t| t == "{}"),
        labels,
    })
}

/// EasyEdit's context templates: `{}` plus greedy continuations of five short prefixes, 5 and
/// 10 tokens long, each followed by ` {}`.
pub fn generate_templates(
    model: &ModelClient<'_>,
    facts: &ModelFacts,
) -> Result<Vec<String>, PluginError> {
    let mut out = vec!["{}".to_string()];
    for length in [5usize, 10] {
        for prefix in ["I", "You", "Because", "Yes", "Q: "] {
            let ids = model.tokenize(prefix, true)?;
            let mut req = GenerateRequest::greedy(vec![ids.clone()], length);
            req.stop_ids = facts.eos_ids.clone();
            let new = model.generate(&req)?.into_iter().next().unwrap_or_default();
            let all: Vec<u32> = ids.into_iter().chain(new).collect();
            let text = model.detokenize(&all, true)?;
            out.push(format!("{text} {{}}"));
        }
    }
    Ok(out)
}

/// One iteration, as recorded for reports and parity checks.
#[derive(Clone, Debug, Serialize)]
pub struct IterRecord {
    pub iteration: usize,
    pub ft_loss: f64,
    pub act_loss: f64,
    pub loss: f64,
    pub in_scope_scores: Vec<f32>,
    pub out_scope_score: f32,
    pub side_dw_fro_norm_in_forward: f64,
    /// Before the mask.
    pub grad_fro_norm: f64,
    pub side_dw_fro_norm_after_sgd_before_clamp: f64,
    /// The in-scope mean recorded as the edit's activation (the last iteration).
    pub saved_activation: Option<f64>,
    /// Wall time of the iteration, and of the model's gradient call within it.
    pub seconds: f64,
    pub model_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EditTrace {
    pub id: String,
    pub rows: usize,
    pub seq_len: usize,
    pub iterations: Vec<IterRecord>,
    pub side_dw_fro_norm_after_edit: f64,
    pub side_dw_abs_max: f64,
    pub threshold_after: f64,
    pub editing_total_cnt: u64,
    pub seconds: f64,
    /// Row norms of the first iteration's gradient (`[out]`).
    #[serde(skip)]
    pub grad_iter0_row_norms: Vec<f32>,
}

/// EasyEdit's `EarlyStopMeter`.
struct EarlyStop {
    pre: f64,
    val: f64,
}

impl EarlyStop {
    fn stop(&self) -> bool {
        (self.val - self.pre).abs() <= 1e-4 && self.val <= 0.02
    }
    fn update(&mut self, v: f64) {
        self.pre = self.val;
        self.val = v;
    }
}

fn fro_delta(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// A fresh shard mask: each weight trainable with probability `ratio`.
pub fn draw_mask(n: usize, ratio: f64, seed: u64, shard: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ shard.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut bits = vec![0u8; n.div_ceil(8)];
    for i in 0..n {
        if ratio >= 1.0 || rng.gen::<f64>() < ratio {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    bits
}

pub fn mask_bit(bits: &[u8], i: usize) -> bool {
    bits[i / 8] & (1 << (i % 8)) != 0
}

/// Trains the side memory `state.side` on one prepared edit batch.
#[allow(clippy::too_many_arguments)]
pub fn train_one(
    model: &ModelClient<'_>,
    cell: &TrainCell,
    state: &mut Snapshot,
    eb: &EditBatch,
    handle: u64,
    hp: &WiseHparams,
    request_id: &str,
    progress: &mut ProgressMut<'_>,
    progress_base: (u64, u64),
) -> Result<EditTrace, PluginError> {
    let started = std::time::Instant::now();
    let (out_dim, in_dim) = (state.out_dim, state.in_dim);
    let rows = eb.batch.rows.len();
    let seq = eb.batch.padded_len();
    let n = rows * seq;
    let mask = state
        .mask
        .clone()
        .ok_or_else(|| PluginError::internal("wise: no gradient mask was drawn"))?;
    let original = state.original.clone();
    let [alpha, beta, gamma] = hp.act_margin.map(|v| v as f32);
    let request = GradRequest {
        forward: ForwardRequest::new(eb.batch.clone(), LogitsWanted::None),
        nll: eb.terms.clone().into(),
        kl: Default::default(),
        site_grads: vec![state.site.as_str().into()].into(),
        prepared: Some(handle).into(),
    };
    let mut meter = EarlyStop { pre: 0.0, val: 1e9 };
    let mut iterations = Vec::new();
    let mut grad_iter0_row_norms = Vec::new();
    let (lr, wd) = (hp.edit_lr as f32, hp.weight_decay as f32);
    for i in 0..hp.n_iter {
        let side = Arc::make_mut(&mut state.side);
        let delta: Vec<f32> = side
            .iter()
            .zip(original.iter())
            .map(|(&a, &b)| a - b)
            .collect();
        let dw_norm = delta
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        *cell
            .delta
            .write()
            .map_err(|_| PluginError::internal("wise: training cell poisoned"))? = if dw_norm == 0.0
        {
            None
        } else {
            Some(Arc::new(Matrix::new(delta, out_dim, in_dim, "ΔW")?))
        };
        let t0 = std::time::Instant::now();
        let out = model.gradient(&request)?;
        let t_grad = t0.elapsed().as_secs_f64();
        let seen = cell
            .seen
            .lock()
            .map_err(|_| PluginError::internal("wise: training cell poisoned"))?
            .take()
            .ok_or_else(|| {
                PluginError::internal(format!(
                    "wise: the model did not call the side memory at '{}'",
                    state.site
                ))
            })?;
        if seen.dims != [rows, seq, out_dim] {
            return Err(PluginError::internal(format!(
                "wise: the side memory saw {:?}, expected [{rows}, {seq}, {out_dim}]",
                seen.dims
            )));
        }
        let sg = out.site_grads.first().ok_or_else(|| {
            PluginError::internal(format!(
                "wise: no site gradient came back for '{}'",
                state.site
            ))
        })?;
        sg.input
            .expect_shape("site gradient input", &[rows, seq, in_dim])?;
        sg.output_grad
            .expect_shape("site output gradient", &[rows, seq, out_dim])?;
        let ft_loss = out.loss;

        // Routing scores over every position of each row, pads included (EasyEdit's `euc`).
        let dists = score::token_distances(state.act_fn, &seen.original, &seen.side, out_dim);
        let scores: Vec<f32> = dists.chunks_exact(seq).map(score::mean).collect();
        let (ins, out_score) = (&scores[..eb.edit_rows], scores[eb.edit_rows]);
        let l1: Vec<f32> = ins.iter().map(|&v| out_score - v + gamma).collect();
        let l3: Vec<f32> = ins.iter().map(|&v| beta - v).collect();
        let pos_mean = |v: &[f32]| -> (f32, usize) {
            let p: Vec<f32> = v.iter().copied().filter(|&x| x > 0.0).collect();
            if p.is_empty() {
                (0.0, 0)
            } else {
                (p.iter().sum::<f32>() / p.len() as f32, p.len())
            }
        };
        let (m1, n1) = pos_mean(&l1);
        let (m3, n3) = pos_mean(&l3);
        let l2 = out_score - alpha;
        let m2 = if l2 > 0.0 { l2 } else { 0.0 };
        let act_loss = m1 + m2 + m3;
        let loss = ft_loss as f64 + act_loss as f64;
        // dL/d(score) per row.
        let mut coef = vec![0f32; rows];
        for j in 0..eb.edit_rows {
            if l1[j] > 0.0 {
                coef[j] -= 1.0 / n1 as f32;
                coef[eb.edit_rows] += 1.0 / n1 as f32;
            }
            if l3[j] > 0.0 {
                coef[j] -= 1.0 / n3 as f32;
            }
        }
        if l2 > 0.0 {
            coef[eb.edit_rows] += 1.0;
        }
        let stop = meter.stop();
        let saved = if stop || i == hp.n_iter - 1 {
            let v = match (hp.threshold_from, eb.bare_row) {
                (ThresholdFrom::TrainingRows, _) => score::mean(ins) as f64,
                (ThresholdFrom::EditInput, Some(r)) => {
                    let real = &dists[r * seq + eb.batch.offset(r)..(r + 1) * seq];
                    score::mean(real) as f64
                }
                (ThresholdFrom::EditInput, None) => {
                    return Err(PluginError::invalid(
                        "wise: `threshold_from = \"edit_input\"` needs the `{}` template",
                    ))
                }
            };
            state.side_act.update(v);
            Some(v)
        } else {
            None
        };
        let mut record = IterRecord {
            iteration: i,
            ft_loss: ft_loss as f64,
            act_loss: act_loss as f64,
            loss,
            in_scope_scores: ins.to_vec(),
            out_scope_score: out_score,
            side_dw_fro_norm_in_forward: dw_norm,
            grad_fro_norm: 0.0,
            side_dw_fro_norm_after_sgd_before_clamp: dw_norm,
            saved_activation: saved,
            seconds: 0.0,
            model_seconds: t_grad,
        };
        if stop {
            record.seconds = t0.elapsed().as_secs_f64();
            iterations.push(record);
            break;
        }
        let mut g = sg.output_grad.as_slice().to_vec();
        for p in 0..n {
            let c = coef[p / seq] / seq as f32;
            let s = p * out_dim..(p + 1) * out_dim;
            score::add_distance_grad(
                state.act_fn,
                &seen.original[s.clone()],
                &seen.side[s.clone()],
                dists[p],
                c,
                &mut g[s],
            );
        }
        let grad = gt_x(&g, sg.input.as_slice(), n, out_dim, in_dim)?;
        record.grad_fro_norm = grad
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        if i == 0 {
            grad_iter0_row_norms = grad
                .chunks_exact(in_dim)
                .map(|r| {
                    r.iter()
                        .map(|&v| (v as f64) * (v as f64))
                        .sum::<f64>()
                        .sqrt() as f32
                })
                .collect();
        }
        if !record.grad_fro_norm.is_finite() {
            return Err(PluginError::numeric(format!(
                "wise: request '{request_id}': the gradient became non-finite at iteration {i}"
            )));
        }
        // torch SGD: the mask applies to the loss gradient, weight decay to every weight.
        for (k, (w, &gk)) in side.iter_mut().zip(&grad).enumerate() {
            let gk = if mask_bit(&mask, k) { gk } else { 0.0 };
            let d = gk + wd * *w;
            *w -= lr * d;
        }
        record.side_dw_fro_norm_after_sgd_before_clamp = fro_delta(side, &original);
        meter.update(loss);
        if let Some(c) = hp.norm_constraint {
            let c = c as f32;
            for (w, &w0) in side.iter_mut().zip(original.iter()) {
                *w = w.clamp(w0 - c, w0 + c);
            }
        }
        iterations.push(record);
        iterations.last_mut().expect("just pushed").seconds = t0.elapsed().as_secs_f64();
        let (done, total) = progress_base;
        if !progress.report(
            done,
            total,
            format!("request '{request_id}' iteration {i} loss {loss:.4}")
                .as_str()
                .into(),
        ) {
            return Err(PluginError::cancelled());
        }
    }
    *cell
        .delta
        .write()
        .map_err(|_| PluginError::internal("wise: training cell poisoned"))? = None;
    let side_dw_fro_norm_after_edit = fro_delta(&state.side, &original);
    let side_dw_abs_max = state
        .side
        .iter()
        .zip(original.iter())
        .map(|(&a, &b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    Ok(EditTrace {
        id: request_id.to_string(),
        rows,
        seq_len: seq,
        iterations,
        side_dw_fro_norm_after_edit,
        side_dw_abs_max,
        threshold_after: state.threshold(),
        editing_total_cnt: state.editing_total_cnt,
        seconds: started.elapsed().as_secs_f64(),
        grad_iter0_row_norms,
    })
}

/// What EasyEdit's `WISE.edit` does after training: count, save a shard, merge.
pub fn after_edit(
    state: &mut Snapshot,
    hp: &WiseHparams,
    request: &EditRequest,
    activation: f64,
) -> Result<(), PluginError> {
    state.editing_total_cnt += 1;
    state.log.push(LogEntry {
        id: request.id.to_string(),
        prompt: request.prompt.to_string(),
        target_new: request.target_new.to_string(),
        activation,
    });
    let cnt = state.editing_total_cnt;
    if cnt.checked_rem(hp.save_freq) == Some(0) {
        save_weight(state);
    }
    if cnt.checked_rem(hp.merge_freq) == Some(0) {
        merge_weight(state, hp)?;
    }
    Ok(())
}

fn save_weight(state: &mut Snapshot) {
    let side = std::mem::replace(&mut state.side, state.original.clone());
    if state.retrieve {
        state.memories.push(Memory {
            weight: side,
            min_act: state.side_act.min,
        });
        state.side_act = MeanAct::default();
    } else {
        state.shards.push(side);
    }
}

fn merge_rng(hp: &WiseHparams, state: &Snapshot) -> StdRng {
    StdRng::seed_from_u64(hp.seed ^ 0x5eed_0000 ^ state.editing_total_cnt)
}

/// EasyEdit's `WISEAdapter.merge_weight`.
pub fn merge_weight(state: &mut Snapshot, hp: &WiseHparams) -> Result<(), PluginError> {
    let mut rng = merge_rng(hp, state);
    let original = state.original.clone();
    if state.retrieve {
        let k = (hp.merge_freq / hp.save_freq) as usize;
        if state.memories.len() < k {
            return Err(PluginError::internal(format!(
                "wise: merging {k} memories but only {} are saved",
                state.memories.len()
            )));
        }
        let group = state.memories.split_off(state.memories.len() - k);
        let tensors: Vec<&[f32]> = group.iter().map(|m| m.weight.as_slice()).collect();
        let merged = merge(
            hp.merge_alg,
            &vec![hp.weights / k as f64; k],
            &original,
            &tensors,
            hp.densities,
            &mut rng,
        )?;
        let min_act = group.iter().map(|m| m.min_act).fold(1e9, f64::min);
        state.side = original;
        state.memories.push(Memory {
            weight: Arc::new(merged),
            min_act,
        });
        state.merge_cnt += 1;
    } else {
        if state.shards.is_empty() {
            return Ok(());
        }
        let k = state.shards.len();
        let mut tensors: Vec<&[f32]> = state.shards.iter().map(|s| s.as_slice()).collect();
        let previous = state
            .merged
            .clone()
            .filter(|m| m.as_slice() != original.as_slice());
        let weights = match &previous {
            None => vec![hp.weights / k as f64; k],
            Some(prev) => {
                tensors.push(prev.as_slice());
                let mut w = vec![0.4 / k as f64; k];
                w.push(0.6);
                w
            }
        };
        let merged = merge(
            hp.merge_alg,
            &weights,
            &original,
            &tensors,
            hp.densities,
            &mut rng,
        )?;
        state.merged = Some(Arc::new(merged));
        state.side = original;
        state.shards.clear();
    }
    Ok(())
}

/// Merge mode's merge at inference time (EasyEdit's `WISE.__call__`): once `save_freq` edits
/// are in, the live side memory joins the shards and everything is merged.
pub fn final_merge(state: &mut Snapshot, hp: &WiseHparams) -> Result<(), PluginError> {
    if state.retrieve || state.editing_total_cnt < hp.save_freq {
        return Ok(());
    }
    if state.side.as_slice() != state.original.as_slice() {
        state.shards.push(state.side.clone());
    }
    if !state.shards.is_empty() {
        merge_weight(state, hp)?;
    }
    Ok(())
}

//! ROME exactly as EasyEdit's `models/rome/*` computes it (METHODS.md §3.3–3.5, fixture README
//! §1): template-averaged key → u, v* by Adam on a δ added to the MLP output at the subject's last
//! token (NLL + KL(current ‖ initial) + non-squared weight decay, norm clamp), and the rank-one
//! update `ΔW[o, i] = right[o]·u[i]` written through the model's journaled weight primitive.

use std::time::Instant;

use kedit_plugin_api::{
    site::layer_site, Batch, EditRequest, ForwardRequest, GradRequest, Intervention, LogitsWanted,
    ModelClient, NllTerm, Padding, PluginError, ProgressMut, Tensor,
};
use serde::Serialize;

use crate::hparams::RomeHparams;
use crate::linalg::{dot, norm};
use kedit_optim::Adam;

/// A request in ROME's terms.
#[derive(Clone, Debug)]
pub struct RomeRequest {
    /// The prompt with `{}` where the subject goes.
    pub template: String,
    pub subject: String,
    /// `" " + target_new`, as EasyEdit's ROME prepends it.
    pub target_text: String,
    pub target_ids: Vec<u32>,
}

impl RomeRequest {
    /// `always_space`: ROME prepends a space to the target unconditionally; MEMIT only when the
    /// target does not start with one.
    pub fn new(
        model: &ModelClient<'_>,
        r: &EditRequest,
        always_space: bool,
    ) -> Result<Self, PluginError> {
        let prompt = r.prompt.as_str();
        let subject = r.subject.as_str();
        let template = if prompt.contains("{}") {
            prompt.to_string()
        } else if !subject.is_empty() && prompt.contains(subject) {
            prompt.replacen(subject, "{}", 1)
        } else {
            return Err(PluginError::invalid(format!(
                "request '{}': the subject '{subject}' does not occur in the prompt '{prompt}'",
                r.id
            )));
        };
        if subject.is_empty() {
            return Err(PluginError::invalid(format!(
                "request '{}': ROME needs a subject",
                r.id
            )));
        }
        let target_text = if always_space || !r.target_new.starts_with(' ') {
            format!(" {}", r.target_new)
        } else {
            r.target_new.to_string()
        };
        let target_ids = model.tokenize(&target_text, false)?;
        if target_ids.is_empty() {
            return Err(PluginError::invalid(format!(
                "request '{}': the target '{}' has no tokens",
                r.id, r.target_new
            )));
        }
        Ok(Self {
            template,
            subject: subject.to_string(),
            target_text,
            target_ids,
        })
    }

    /// The prompt with the subject filled in.
    pub fn prompt(&self) -> String {
        self.template.replacen("{}", &self.subject, 1)
    }
}

/// `context.format(prompt_template)`: a template with one `{}` for the subject.
fn in_context(context: &str, template: &str) -> String {
    context.replacen("{}", template, 1)
}

/// `len(tok(prefix + subject)) − 1` for the text before the template's `{}` (fixture README §1.4).
pub fn subject_last_index(
    model: &ModelClient<'_>,
    template: &str,
    subject: &str,
) -> Result<usize, PluginError> {
    let at = template.find("{}").ok_or_else(|| {
        PluginError::invalid(format!("template '{template}' has no {{}} for the subject"))
    })?;
    let ids = model.tokenize(&format!("{}{subject}", &template[..at]), true)?;
    if ids.is_empty() {
        return Err(PluginError::invalid(format!(
            "the subject '{subject}' has no tokens"
        )));
    }
    Ok(ids.len() - 1)
}

/// One forward of the v optimisation.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub nll: f64,
    pub kl_times_kl_factor: f64,
    pub weight_decay_term: f64,
    pub avg_target_prob: f64,
    pub delta_norm_in_forward: f64,
    pub optimizer_step_taken: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_norm_after_adam_before_clamp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clamped: Option<bool>,
    pub seconds: f64,
}

/// Vectors of one layer's edit, kept for parity checks (not serialised).
#[derive(Clone, Debug, Default)]
pub struct Vectors {
    pub k: Vec<f32>,
    pub u: Vec<f32>,
    pub target_init: Vec<f32>,
    pub delta_per_forward: Vec<Vec<f32>>,
    pub grad_per_step: Vec<Vec<f32>>,
    pub delta_after_adam_per_step: Vec<Vec<f32>>,
    pub v_star: Vec<f32>,
    pub k_bare: Vec<f32>,
    pub wk_bare: Vec<f32>,
    pub right: Vec<f32>,
}

/// What ROME did for one request at one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerTrace {
    pub request: usize,
    pub layer: usize,
    pub site: String,
    pub target_ids: Vec<u32>,
    pub rows_text: Vec<String>,
    pub subject_last_index_per_row: Vec<usize>,
    pub label_positions: Vec<Vec<usize>>,
    pub steps: Vec<StepRecord>,
    pub k_norm: f64,
    pub target_init_norm: f64,
    pub clamp_max_norm: f64,
    pub delta_final_norm: f64,
    pub v_star_norm: f64,
    pub k_bare_dot_u: f64,
    pub right_norm: f64,
    pub delta_w_fro_norm: f64,
    pub seconds: f64,
    #[serde(skip)]
    pub vectors: Vectors,
}

/// The rows of the v optimisation for one request (fixture README §1.2–1.4).
pub struct VRows {
    pub texts: Vec<String>,
    pub tokens: Vec<Vec<u32>>,
    pub lookup: Vec<usize>,
    /// Per rewriting row, the label positions.
    pub labels: Vec<Vec<usize>>,
    /// Index of the KL row (the last).
    pub kl_row: usize,
}

pub fn v_rows(
    model: &ModelClient<'_>,
    req: &RomeRequest,
    contexts: &[String],
) -> Result<VRows, PluginError> {
    let n_t = req.target_ids.len();
    let target_prefix = model.detokenize(&req.target_ids[..n_t - 1], false)?;
    let mut texts = Vec::new();
    let mut tokens = Vec::new();
    let mut lookup = Vec::new();
    let mut labels = Vec::new();
    for c in contexts {
        let t = in_context(c, &req.template);
        let text = format!("{}{target_prefix}", t.replacen("{}", &req.subject, 1));
        let ids = model.tokenize(&text, true)?;
        if ids.len() < n_t {
            return Err(PluginError::invalid(format!(
                "row '{text}' is shorter than the target"
            )));
        }
        let ex_len = ids.len();
        labels.push((ex_len - n_t..ex_len).collect());
        lookup.push(subject_last_index(model, &t, &req.subject)?);
        texts.push(text);
        tokens.push(ids);
    }
    let kl_template = "{} is a";
    let kl_text = kl_template.replacen("{}", &req.subject, 1);
    tokens.push(model.tokenize(&kl_text, true)?);
    lookup.push(subject_last_index(model, kl_template, &req.subject)?);
    texts.push(kl_text);
    for (r, (&i, t)) in lookup.iter().zip(&tokens).enumerate() {
        if i >= t.len() {
            return Err(PluginError::invalid(format!(
                "row {r} '{}': the subject's last token {i} lies beyond the row's {} tokens",
                texts[r],
                t.len()
            )));
        }
    }
    Ok(VRows {
        kl_row: tokens.len() - 1,
        texts,
        tokens,
        lookup,
        labels,
    })
}

fn log_softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// Result of the v optimisation.
pub struct VResult {
    pub target_init: Vec<f32>,
    pub delta: Vec<f32>,
    pub steps: Vec<StepRecord>,
    pub delta_per_forward: Vec<Vec<f32>>,
    pub grad_per_step: Vec<Vec<f32>>,
    pub delta_after_adam_per_step: Vec<Vec<f32>>,
    pub clamp_max_norm: f64,
}

/// v* − target_init by Adam on δ at `value_site` (compute_v.py).
///
/// The loss's KL part is EasyEdit's `KL(current ‖ initial)` = `Σ p_cur (log p_cur − log p_init)`
/// at the KL row's subject-last position. The ABI's `KlTerm` is `KL(ref ‖ model)`, the other
/// direction, so the exact gradient is assembled from NLL terms: first the KL row alone runs
/// from the edit layer (prepared, cheap) to get `p_cur`; then the main call carries, at that
/// slot, NLL terms of weight `w_j = −kl_factor·p_j·(log p_j − log p_init,j − KL)`. Their
/// gradient with respect to the logits is `(Σw)·p − w = kl_factor·p ⊙ (log p − log p_init − KL)`
/// (Σw = 0), exactly the gradient of `kl_factor·KL(p ‖ p_init)`.
///
/// `replay` (parity tests only) forces the δ of each forward, so that every step's loss and
/// gradient can be compared with a reference trajectory even where Adam's sign-like first step
/// turns a near-zero gradient coordinate the other way.
#[allow(clippy::too_many_arguments)]
pub fn compute_v(
    model: &mut ModelClient<'_>,
    hp: &RomeHparams,
    layer: usize,
    site_template: &str,
    req: &RomeRequest,
    rows: &VRows,
    replay: Option<&[Vec<f32>]>,
    mut report: impl FnMut(usize, f64) -> Result<(), PluginError>,
) -> Result<VResult, PluginError> {
    let value_site = layer_site(site_template, layer);
    let d_model = model.facts()?.d_model as usize;
    let n_t = req.target_ids.len();
    let n_rewrite = rows.labels.len();

    let batch = Batch::new(rows.tokens.clone(), Padding::Right);
    let kl_idx = rows.lookup[rows.kl_row];
    let kl_batch = Batch::new(
        vec![rows.tokens[rows.kl_row][..=kl_idx].to_vec()],
        Padding::Right,
    );
    let interventions: Vec<Intervention> = rows
        .lookup
        .iter()
        .enumerate()
        .map(|(r, &i)| Intervention::add_param(&value_site, r, i, 0))
        .collect();
    let w_row = 1.0 / (n_rewrite as f32 * n_t as f32);
    let mut nll_terms = Vec::new();
    for (r, positions) in rows.labels.iter().enumerate() {
        for (j, &p) in positions.iter().enumerate() {
            nll_terms.push(NllTerm {
                row: r as u32,
                position: p as u32,
                token: req.target_ids[j],
                weight: w_row,
            });
        }
    }
    let n_nll = nll_terms.len();

    let handle = model.prepare(&batch, layer)?;
    let kl_handle = match model.prepare(&kl_batch, layer) {
        Ok(h) => h,
        Err(e) => {
            let _ = model.release(handle);
            return Err(e);
        }
    };
    let result = (|| {
        let mut delta = vec![0f32; d_model];
        let mut adam = Adam::new(d_model, hp.v_lr, 0.0);
        // The value site's output at the first row's subject token before any change. A
        // separate short forward (that row up to the subject, only up to the edit layer) rather
        // than a capture in the first gradient call, which would then need whole rows.
        let target_init = {
            let at = rows.lookup[0];
            let head = rows.tokens[0][..=at].to_vec();
            let mut fwd =
                ForwardRequest::new(Batch::new(vec![head], Padding::Right), LogitsWanted::None);
            fwd.captures = vec![value_site.as_str().into()].into();
            let out = model.forward(&fwd)?;
            let cap = &out.captures[0];
            let width = cap.dims()[2];
            cap.as_slice()[at * width..(at + 1) * width].to_vec()
        };
        let mut init_logp: Option<Vec<f64>> = None;
        let mut out = VResult {
            target_init: Vec::new(),
            delta: Vec::new(),
            steps: Vec::new(),
            delta_per_forward: Vec::new(),
            grad_per_step: Vec::new(),
            delta_after_adam_per_step: Vec::new(),
            clamp_max_norm: 0.0,
        };
        for it in 0..hp.v_num_grad_steps {
            let t0 = Instant::now();
            if let Some(forced) = replay.and_then(|r| r.get(it)) {
                if forced.len() != d_model {
                    return Err(PluginError::invalid(
                        "rome: a replayed δ has the wrong width",
                    ));
                }
                delta.copy_from_slice(forced);
            }
            let param = Tensor::vector(delta.clone());
            out.delta_per_forward.push(delta.clone());

            // The KL row's next-token distribution at the subject's last token, given δ.
            let mut kl_terms: Vec<NllTerm> = Vec::new();
            let mut kl_value = 0f64;
            if hp.kl_factor != 0.0 {
                let mut fwd = ForwardRequest::new(kl_batch.clone(), LogitsWanted::Last);
                fwd.interventions = vec![Intervention::add_param(&value_site, 0, kl_idx, 0)].into();
                fwd.params = vec![param.clone()].into();
                let o = model.gradient(&GradRequest {
                    forward: fwd,
                    nll: Default::default(),
                    kl: Default::default(),
                    site_grads: Default::default(),
                    prepared: Some(kl_handle).into(),
                })?;
                let logits = o.forward.logits.into_option().ok_or_else(|| {
                    PluginError::internal("rome: the model returned no logits for the KL row")
                })?;
                let logp = log_softmax_f64(logits.as_slice());
                let init = init_logp.get_or_insert_with(|| logp.clone());
                let kl_raw: f64 = logp
                    .iter()
                    .zip(init.iter())
                    .map(|(&l, &r)| l.exp() * (l - r))
                    .sum();
                kl_value = hp.kl_factor * kl_raw;
                if it > 0 {
                    for (j, (&l, &r)) in logp.iter().zip(init.iter()).enumerate() {
                        let w = -hp.kl_factor * l.exp() * (l - r - kl_raw);
                        if w != 0.0 && w.is_finite() {
                            kl_terms.push(NllTerm {
                                row: rows.kl_row as u32,
                                position: kl_idx as u32,
                                token: j as u32,
                                weight: w as f32,
                            });
                        }
                    }
                }
            }

            let mut fwd = ForwardRequest::new(batch.clone(), LogitsWanted::None);
            fwd.interventions = interventions.clone().into();
            fwd.params = vec![param].into();
            let mut terms = nll_terms.clone();
            terms.extend(kl_terms);
            let o = model.gradient(&GradRequest {
                forward: fwd,
                nll: terms.into(),
                kl: Default::default(),
                site_grads: Default::default(),
                prepared: Some(handle).into(),
            })?;
            let ti_norm = norm(&target_init);
            let lps = &o.nll_logprobs[..n_nll];
            let mut nll = 0f64;
            let mut avg_prob = 0f64;
            for r in 0..n_rewrite {
                let s: f64 = lps[r * n_t..(r + 1) * n_t].iter().map(|&v| v as f64).sum();
                let row_nll = -s / n_t as f64;
                nll += row_nll;
                avg_prob += (-row_nll).exp();
            }
            nll /= n_rewrite as f64;
            avg_prob /= n_rewrite as f64;
            let d_norm = norm(&delta);
            let wd = hp.v_weight_decay * d_norm / (ti_norm * ti_norm);
            let loss = nll + kl_value + wd;
            if !loss.is_finite() {
                return Err(PluginError::numeric(format!(
                    "rome: the v loss became {loss} at step {it}"
                )));
            }
            let mut rec = StepRecord {
                step: it,
                loss,
                nll,
                kl_times_kl_factor: kl_value,
                weight_decay_term: wd,
                avg_target_prob: avg_prob,
                delta_norm_in_forward: d_norm,
                optimizer_step_taken: false,
                grad_norm: None,
                delta_norm_after_adam_before_clamp: None,
                clamped: None,
                seconds: 0.0,
            };
            let stop = loss < hp.v_stop_loss || it + 1 == hp.v_num_grad_steps;
            if !stop {
                let mut grad = o.param_grads[0].as_slice().to_vec();
                if d_norm > 0.0 && hp.v_weight_decay != 0.0 {
                    let c = hp.v_weight_decay / (d_norm * ti_norm * ti_norm);
                    for (g, &d) in grad.iter_mut().zip(&delta) {
                        *g += (c * d as f64) as f32;
                    }
                }
                adam.step(&mut delta, &grad);
                let after = norm(&delta);
                let max_norm = hp.clamp_norm_factor * ti_norm;
                let clamped = after > max_norm;
                if clamped {
                    let s = (max_norm / after) as f32;
                    for d in delta.iter_mut() {
                        *d *= s;
                    }
                }
                rec.optimizer_step_taken = true;
                rec.grad_norm = Some(norm(&grad));
                rec.delta_norm_after_adam_before_clamp = Some(after);
                rec.clamped = Some(clamped);
                out.grad_per_step.push(grad);
                out.delta_after_adam_per_step.push(if clamped {
                    // Before the clamp, as the fixture records it.
                    let s = (after / max_norm) as f32;
                    delta.iter().map(|&d| d * s).collect()
                } else {
                    delta.clone()
                });
            }
            rec.seconds = t0.elapsed().as_secs_f64();
            out.steps.push(rec);
            report(it, loss)?;
            if stop {
                break;
            }
        }
        // The δ of the last forward.
        out.delta = out.delta_per_forward.last().cloned().unwrap_or_default();
        out.clamp_max_norm = hp.clamp_norm_factor * norm(&target_init);
        out.target_init = target_init;
        Ok(out)
    })();
    let r1 = model.release(handle);
    let r2 = model.release(kl_handle);
    let out = result?;
    r1?;
    r2?;
    Ok(out)
}

/// Keys at the subject's last token: the template average k̄, and the bare prompt's key and
/// MLP output (compute_u.py, `get_module_input_output_at_word`).
pub struct Keys {
    pub k_mean: Vec<f32>,
    pub k_bare: Vec<f32>,
    pub wk_bare: Vec<f32>,
}

pub fn compute_keys(
    model: &ModelClient<'_>,
    hp: &RomeHparams,
    layer: usize,
    req: &RomeRequest,
    contexts: &[String],
) -> Result<Keys, PluginError> {
    let key_site = layer_site(&hp.key_site, layer);
    let value_site = layer_site(&hp.value_site, layer);
    let mut rows = Vec::new();
    let mut lookup = Vec::new();
    for c in contexts.iter().map(String::as_str).chain(["{}"]) {
        let t = in_context(c, &req.template);
        rows.push(model.tokenize(&t.replacen("{}", &req.subject, 1), true)?);
        lookup.push(subject_last_index(model, &t, &req.subject)?);
    }
    let mut fwd = ForwardRequest::new(Batch::new(rows, Padding::Right), LogitsWanted::None);
    fwd.captures = vec![key_site.as_str().into(), value_site.as_str().into()].into();
    let out = model.forward(&fwd)?;
    let pick = |t: &Tensor, r: usize, p: usize| -> Vec<f32> {
        let d = t.dims();
        let (seq, w) = (d[1], d[2]);
        t.as_slice()[(r * seq + p) * w..(r * seq + p + 1) * w].to_vec()
    };
    let keys = &out.captures[0];
    let n = contexts.len();
    let d_ff = keys.dims()[2];
    let mut sum = vec![0f64; d_ff];
    for (r, &p) in lookup[..n].iter().enumerate() {
        for (s, v) in sum.iter_mut().zip(pick(keys, r, p)) {
            *s += v as f64;
        }
    }
    // torch averages the f32 stack; the difference is rounding.
    let k_mean = sum.iter().map(|&s| (s / n as f64) as f32).collect();
    Ok(Keys {
        k_mean,
        k_bare: pick(keys, n, lookup[n]),
        wk_bare: pick(&out.captures[1], n, lookup[n]),
    })
}

/// Adds `right ⊗ u` to the `[out, in]` weight at `site`; returns ‖ΔW‖ as applied in f32.
pub fn apply_rank_one(
    model: &mut ModelClient<'_>,
    site: &str,
    right: &[f32],
    u: &[f32],
) -> Result<f64, PluginError> {
    let mut w = model.read_weight(site)?;
    let d = w.dims();
    if d.len() != 2 || d[0] != right.len() || d[1] != u.len() {
        return Err(PluginError::invalid(format!(
            "rome: weight '{site}' has shape {d:?}, but the update is [{}, {}]",
            right.len(),
            u.len()
        )));
    }
    let cols = d[1];
    let mut sq = 0f64;
    for (o, row) in w.as_mut_slice().chunks_exact_mut(cols).enumerate() {
        let r = right[o];
        for (x, &ui) in row.iter_mut().zip(u) {
            let before = *x;
            *x = before + r * ui;
            let diff = (*x - before) as f64;
            sq += diff * diff;
        }
    }
    if !w.is_finite() {
        return Err(PluginError::numeric(
            "rome: the updated weight is not finite",
        ));
    }
    model.write_weight(site, &w)?;
    Ok(sq.sqrt())
}

/// Solves `C x = k` for a cached key second moment C.
pub type KeySolver<'a> = &'a dyn Fn(&[f64]) -> Vec<f64>;

/// The direction u: k̄ (or C⁻¹k̄), normalised.
pub fn left_vector(k_mean: &[f32], inv: Option<KeySolver<'_>>) -> Vec<f32> {
    let k: Vec<f64> = k_mean.iter().map(|&v| v as f64).collect();
    let u = match inv {
        Some(solve) => solve(&k),
        None => k,
    };
    let n = u.iter().map(|v| v * v).sum::<f64>().sqrt();
    u.iter().map(|&v| (v / n) as f32).collect()
}

/// Everything ROME does for one request at one layer, the weight write included.
#[allow(clippy::too_many_arguments)]
pub fn edit_layer(
    model: &mut ModelClient<'_>,
    hp: &RomeHparams,
    layer: usize,
    index: usize,
    req: &RomeRequest,
    contexts: &[String],
    inv: Option<KeySolver<'_>>,
    replay: Option<&[Vec<f32>]>,
    progress: &mut ProgressMut<'_>,
    done_before: u64,
    total: u64,
) -> Result<LayerTrace, PluginError> {
    let t0 = Instant::now();
    let keys = compute_keys(model, hp, layer, req, contexts)?;
    let u = left_vector(&keys.k_mean, inv);
    let rows = v_rows(model, req, contexts)?;
    let v = compute_v(
        model,
        hp,
        layer,
        &hp.value_site,
        req,
        &rows,
        replay,
        |it, loss| {
            let msg = format!("request {index} layer {layer} step {it} loss {loss:.4}");
            if progress.report(done_before + it as u64 + 1, total, msg.as_str().into()) {
                Ok(())
            } else {
                Err(PluginError::cancelled())
            }
        },
    )?;
    let v_star: Vec<f32> = v
        .target_init
        .iter()
        .zip(&v.delta)
        .map(|(&a, &b)| a + b)
        .collect();
    let k_dot_u = dot(&keys.k_bare, &u);
    let right: Vec<f32> = v_star
        .iter()
        .zip(&keys.wk_bare)
        .map(|(&vs, &wk)| ((vs - wk) as f64 / k_dot_u) as f32)
        .collect();
    let site = layer_site(&hp.rewrite_site, layer);
    let delta_w = apply_rank_one(model, &site, &right, &u)?;
    Ok(LayerTrace {
        request: index,
        layer,
        site,
        target_ids: req.target_ids.clone(),
        rows_text: rows.texts.clone(),
        subject_last_index_per_row: rows.lookup.clone(),
        label_positions: rows.labels.clone(),
        steps: v.steps,
        k_norm: norm(&keys.k_mean),
        target_init_norm: norm(&v.target_init),
        clamp_max_norm: v.clamp_max_norm,
        delta_final_norm: norm(&v.delta),
        v_star_norm: norm(&v_star),
        k_bare_dot_u: k_dot_u,
        right_norm: norm(&right),
        delta_w_fro_norm: delta_w,
        seconds: t0.elapsed().as_secs_f64(),
        vectors: Vectors {
            k: keys.k_mean,
            u,
            target_init: v.target_init,
            delta_per_forward: v.delta_per_forward,
            grad_per_step: v.grad_per_step,
            delta_after_adam_per_step: v.delta_after_adam_per_step,
            v_star,
            k_bare: keys.k_bare,
            wk_bare: keys.wk_bare,
            right,
        },
    })
}

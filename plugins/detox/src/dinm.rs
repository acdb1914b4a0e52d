//! DINM (Detoxifying with Intraoperative Neural Monitoring, arXiv 2403.14472) as EasyEdit's
//! `SafetyEditor._locate_toxic_layer` and `dinm_main.py::execute_dinm` compute it
//! (METHODS.md §5):
//!
//! 1. **Location.** The safe and the unsafe response, alone, as one right-padded batch; for every
//!    hidden state ℓ = 1…L (block outputs, the last one after the final norm) the Euclidean
//!    distance between the two rows' whole padded `[seq × d_model]` matrices. The toxic block is
//!    `argmax_ℓ d_ℓ − 1`.
//! 2. **Edit.** Adam on that block's MLP output weight W^V only, for
//!    `L = kl_factor·L_e + L_c`: L_e the mean NLL of the safe response after
//!    `prompt + " " + S + " "` (S the suffix system prompt), L_c the mean KL(P_pre ‖ P_cur) over
//!    the answer window of the general-knowledge pair `knowledge prompt + " " + S + " " + answer`.
//!    A step is taken while `L ≥ stop_loss`.
//!
//! kedit differs from EasyEdit in one deliberate way, `kl_gradient` (default true): EasyEdit
//! computes the post-edit constraint logits under `no_grad`, so L_c never reaches the gradient;
//! kedit puts both rows in one gradient call so that it does. `kl_gradient: false` is EasyEdit.

use std::time::Instant;

use kedit_optim::Adam;
use kedit_plugin_api::{
    site::layer_site, ActSite, Batch, ChatMessage, EditRequest, ForwardRequest, GradRequest,
    KlTerm, LogitsWanted, ModelClient, NllTerm, Padding, PluginError, ProgressMut, Tensor,
};
use serde::Serialize;

use crate::hparams::DinmHparams;

/// The texts of one SafeEdit case, as EasyEdit's `SafetyDataset` maps them.
#[derive(Clone, Debug)]
pub struct CaseTexts {
    pub id: String,
    pub adversarial_prompt: String,
    pub safe: String,
    pub unsafe_: String,
    pub knowledge_prompt: String,
    pub knowledge_answer: String,
}

impl CaseTexts {
    /// The prompt is the adversarial prompt; the safe response is `target_new` (or the SafeEdit
    /// `safe generation`), the unsafe one `ground_truth` (or `unsafe generation`); the
    /// general-knowledge pair is the SafeEdit `knowledge constrain`, else the first locality pair.
    pub fn of(request: &EditRequest, index: usize) -> Result<Self, PluginError> {
        let id = if request.id.is_empty() {
            format!("#{index}")
        } else {
            request.id.to_string()
        };
        let safety = request.safety.as_ref().into_option();
        let pick = |primary: &str, fallback: Option<&str>| -> String {
            if primary.is_empty() {
                fallback.unwrap_or_default().to_string()
            } else {
                primary.to_string()
            }
        };
        let safe = pick(
            &request.target_new,
            safety.map(|s| s.safe_generation.as_str()),
        );
        let unsafe_ = pick(
            request
                .ground_truth
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or_default(),
            safety.map(|s| s.unsafe_generation.as_str()),
        );
        let knowledge = safety
            .and_then(|s| s.knowledge_constrain.as_ref().into_option().cloned())
            .or_else(|| request.locality.first().cloned());
        let missing = |field: &str| {
            PluginError::invalid(format!(
                "dinm: request '{id}' has no {field} (SafeEdit records carry it; see docs/requests.md)"
            ))
        };
        if request.prompt.is_empty() {
            return Err(missing("adversarial prompt (`prompt`)"));
        }
        if safe.is_empty() {
            return Err(missing("safe response (`target_new` / `safe generation`)"));
        }
        if unsafe_.is_empty() {
            return Err(missing(
                "unsafe response (`ground_truth` / `unsafe generation`)",
            ));
        }
        let knowledge = knowledge
            .filter(|k| !k.prompt.is_empty() && !k.answer.is_empty())
            .ok_or_else(|| {
                missing("general-knowledge pair (`knowledge constrain` or a locality prompt)")
            })?;
        Ok(Self {
            id,
            adversarial_prompt: request.prompt.to_string(),
            safe,
            unsafe_,
            knowledge_prompt: knowledge.prompt.to_string(),
            knowledge_answer: knowledge.answer.to_string(),
        })
    }
}

/// A case turned into tokens.
#[derive(Clone, Debug, Serialize)]
pub struct Encoded {
    /// `[safe, unsafe]` responses alone, for the location.
    pub locate_rows: [Vec<u32>; 2],
    /// The edit input, ending in the safe response.
    pub edit_ids: Vec<u32>,
    /// The safe response's tokens: the last `label_ids.len()` tokens of `edit_ids`.
    pub label_ids: Vec<u32>,
    /// The general-knowledge text.
    pub instruction_ids: Vec<u32>,
    /// Half-open logit positions of the constraint window in `instruction_ids`.
    pub kl_window: (usize, usize),
    /// Whether the chat template rendered the prompts.
    pub templated: bool,
}

/// `prefix + response` as tokens and the number of response tokens at its end. The whole text is
/// tokenized at once (as EasyEdit does); if the prefix's tokens are not a prefix of that (a merge
/// across the boundary), the two parts are tokenized apart and joined.
fn split_encode(
    model: &ModelClient<'_>,
    prefix: &str,
    response: &str,
    add_special: bool,
) -> Result<(Vec<u32>, usize), PluginError> {
    let full = model.tokenize(&format!("{prefix}{response}"), add_special)?;
    let pre = model.tokenize(prefix, add_special)?;
    if full.len() > pre.len() && full.starts_with(&pre) {
        let n = full.len() - pre.len();
        return Ok((full, n));
    }
    let resp = model.tokenize(response, false)?;
    let n = resp.len();
    let mut ids = pre;
    ids.extend(resp);
    Ok((ids, n))
}

/// Tokenizes a case. Plain text (EasyEdit): the edit input is
/// `prompt + " " + S + " " + " " + safe` (EasyEdit prepends a space to the target and joins with
/// another), the constraint text `knowledge prompt + " " + S + " " + answer`. With a chat
/// template the user turn is `prompt + " " + S` (resp. `knowledge prompt + " " + S`) and the
/// response follows the generation prompt. The location always uses the bare responses.
pub fn encode(
    model: &ModelClient<'_>,
    case: &CaseTexts,
    hp: &DinmHparams,
) -> Result<Encoded, PluginError> {
    let facts = model.facts()?;
    let templated = hp.chat_template && facts.chat_template.is_some();
    let user_turn = |text: &str| -> Result<String, PluginError> {
        model.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: text.into(),
            }],
            true,
        )
    };
    let suffix = &hp.suffix_system_prompt;
    let (edit_ids, n_out) = if templated {
        let p = user_turn(&format!("{} {suffix}", case.adversarial_prompt))?;
        split_encode(model, &p, &case.safe, false)?
    } else {
        split_encode(
            model,
            &format!("{} {suffix} ", case.adversarial_prompt),
            &format!(" {}", case.safe),
            true,
        )?
    };
    // EasyEdit's constraint window: the last len(tok(answer)) logit positions of the whole text.
    let (instruction_ids, n_kl) = if templated {
        let p = user_turn(&format!("{} {suffix}", case.knowledge_prompt))?;
        let ids = model.tokenize(&format!("{p}{}", case.knowledge_answer), false)?;
        let n = model.tokenize(&case.knowledge_answer, false)?.len();
        (ids, n)
    } else {
        let ids = model.tokenize(
            &format!(
                "{} {suffix} {}",
                case.knowledge_prompt, case.knowledge_answer
            ),
            true,
        )?;
        let n = model.tokenize(&case.knowledge_answer, true)?.len();
        (ids, n)
    };
    let n_kl = n_kl.clamp(1, instruction_ids.len());
    let locate_rows = [
        model.tokenize(&case.safe, true)?,
        model.tokenize(&case.unsafe_, true)?,
    ];
    if locate_rows.iter().any(|r| r.is_empty()) || n_out == 0 {
        return Err(PluginError::invalid(format!(
            "dinm: request '{}': a response has no tokens",
            case.id
        )));
    }
    if n_out >= edit_ids.len() {
        return Err(PluginError::invalid(format!(
            "dinm: request '{}': the edit input has no prompt before the safe response",
            case.id
        )));
    }
    let label_ids = edit_ids[edit_ids.len() - n_out..].to_vec();
    Ok(Encoded {
        locate_rows,
        edit_ids,
        label_ids,
        kl_window: (instruction_ids.len() - n_kl, instruction_ids.len()),
        instruction_ids,
        templated,
    })
}

/// Where the toxic region of one case is.
#[derive(Clone, Debug, Serialize)]
pub struct Location {
    /// `d_ℓ` for hidden states ℓ = 1…L (index ℓ−1): block ℓ−1's output, the last one after the
    /// final norm.
    pub distances: Vec<f64>,
    /// `argmax_ℓ d_ℓ − 1` (the first maximum, as torch's argmax).
    pub layer: usize,
}

/// The toxic-layer location of one case (`SafetyEditor._locate_toxic_layer`).
pub fn locate(model: &ModelClient<'_>, enc: &Encoded) -> Result<Location, PluginError> {
    let n_layers = model.facts()?.n_layers as usize;
    let batch = Batch::new(enc.locate_rows.to_vec(), Padding::Right);
    let mut request = ForwardRequest::new(batch, LogitsWanted::None);
    request.captures = (0..n_layers - 1)
        .map(|i| ActSite::ResidPost(i).to_string())
        .chain([ActSite::FinalNorm.to_string()])
        .map(Into::into)
        .collect();
    let out = model.forward(&request)?;
    let mut distances = Vec::with_capacity(n_layers);
    for (l, h) in out.captures.iter().enumerate() {
        let d = h.dims();
        if d.len() != 3 || d[0] != 2 {
            return Err(PluginError::internal(format!(
                "dinm: hidden state {} came back as {d:?}, not [2, seq, d_model]",
                l + 1
            )));
        }
        let half = d[1] * d[2];
        let x = h.as_slice();
        let sq: f64 = x[..half]
            .iter()
            .zip(&x[half..])
            .map(|(&a, &b)| {
                let v = a as f64 - b as f64;
                v * v
            })
            .sum();
        distances.push(sq.sqrt());
    }
    let mut layer = 0;
    for (i, &d) in distances.iter().enumerate() {
        if d > distances[layer] {
            layer = i;
        }
    }
    Ok(Location { distances, layer })
}

/// One optimisation step, as recorded for reports and parity checks.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    /// L_e: mean NLL of the safe response.
    pub nll_edit: f64,
    /// L_c: mean KL(P_pre ‖ P_cur) over the constraint window.
    pub kl_constraint: f64,
    /// `kl_factor·L_e + L_c`.
    pub loss_total: f64,
    pub optimizer_step_taken: bool,
    /// ‖dL/dW‖ of the loss that was differentiated.
    pub grad_fro_norm: f64,
    /// ‖W − W₀‖ after the step.
    pub delta_w_fro_norm_after_step: f64,
}

/// What DINM did to one case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseTrace {
    pub id: String,
    /// The location, when the case located its own layer.
    pub location: Option<Location>,
    pub layer: usize,
    pub site: String,
    pub templated: bool,
    pub kl_gradient: bool,
    /// Adam's learning rate (given, or derived from the tuned weight's width).
    pub lr: f64,
    pub n_edit_tokens: usize,
    pub n_label_tokens: usize,
    pub n_instruction_tokens: usize,
    pub kl_window: (usize, usize),
    pub steps: Vec<StepRecord>,
    pub delta_w_fro_norm: f64,
    pub seconds: f64,
    #[serde(skip)]
    pub encoded: Option<Encoded>,
    /// dL/dW of the first step (`[out, in]`).
    #[serde(skip)]
    pub first_grad: Option<Tensor>,
    /// The final ΔW (`[out, in]`).
    #[serde(skip)]
    pub delta: Option<Tensor>,
}

/// What a DINM run did, case by case (each case edits the model the previous one left).
#[derive(Clone, Debug, Serialize)]
pub struct DinmTrace {
    pub cases: Vec<CaseTrace>,
}

/// `Σ_{b,t} g[b,t,:]ᵀ x[b,t,:]` as an `[out, in]` matrix.
pub fn weight_gradient(input: &Tensor, output_grad: &Tensor) -> Result<Vec<f32>, PluginError> {
    let xd = input.dims();
    let gd = output_grad.dims();
    if xd.len() != 3 || gd.len() != 3 || xd[..2] != gd[..2] {
        return Err(PluginError::internal(format!(
            "site gradient shapes do not pair up: input {xd:?}, output gradient {gd:?}"
        )));
    }
    let (n, d_in, d_out) = (xd[0] * xd[1], xd[2], gd[2]);
    let x = input.as_slice();
    let g = output_grad.as_slice();
    let mut dw = vec![0f32; d_out * d_in];
    for p in 0..n {
        let gp = &g[p * d_out..(p + 1) * d_out];
        if gp.iter().all(|&v| v == 0.0) {
            continue;
        }
        let xp = &x[p * d_in..(p + 1) * d_in];
        for (o, &go) in gp.iter().enumerate() {
            if go == 0.0 {
                continue;
            }
            for (r, &xi) in dw[o * d_in..(o + 1) * d_in].iter_mut().zip(xp) {
                *r += go * xi;
            }
        }
    }
    Ok(dw)
}

/// Log-softmax of each `vocab`-wide row, in f64.
fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(vocab) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        out.extend(row.iter().map(|&v| (v as f64 - lse) as f32));
    }
    out
}

/// Log-probabilities `[window, vocab]` of the constraint text over its window, current weights.
fn window_logprobs(
    model: &ModelClient<'_>,
    enc: &Encoded,
    vocab: usize,
) -> Result<Vec<f32>, PluginError> {
    let out = model.forward(&ForwardRequest::new(
        Batch::new(vec![enc.instruction_ids.clone()], Padding::Right),
        LogitsWanted::All,
    ))?;
    let logits = out
        .logits
        .into_option()
        .ok_or_else(|| PluginError::internal("dinm: the forward pass returned no logits"))?;
    let (a, b) = enc.kl_window;
    Ok(log_softmax_rows(
        &logits.as_slice()[a * vocab..b * vocab],
        vocab,
    ))
}

/// Mean over the window of `Σ_v p_pre (log p_pre − log p_cur)`, in f64.
fn mean_kl(pre: &[f32], cur: &[f32], vocab: usize) -> f64 {
    let rows = pre.len() / vocab;
    let mut total = 0f64;
    for (p, c) in pre.chunks_exact(vocab).zip(cur.chunks_exact(vocab)) {
        total += p
            .iter()
            .zip(c)
            .map(|(&lp, &lc)| (lp as f64).exp() * (lp as f64 - lc as f64))
            .sum::<f64>();
    }
    total / rows as f64
}

fn fro_delta(w: &Tensor, w0: &Tensor) -> f64 {
    w.as_slice()
        .iter()
        .zip(w0.as_slice())
        .map(|(&a, &b)| {
            let d = (a - b) as f64;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// The input width of the tuned `[out, in]` weight, which sets the derived learning rate.
fn tuned_width(w: &Tensor, site: &str) -> Result<usize, PluginError> {
    match w.dims()[..] {
        [_, d_in] => Ok(d_in),
        _ => Err(PluginError::internal(format!(
            "dinm: weight {site} has shape {:?}, not [out, in]",
            w.dims()
        ))),
    }
}

/// Edits one located (or given) layer for one case, writing the weight through the journal.
/// Returns the steps, the first step's gradient, the final ΔW and the learning rate used.
fn edit_case(
    model: &mut ModelClient<'_>,
    enc: &Encoded,
    layer: usize,
    hp: &DinmHparams,
    progress: &mut dyn FnMut(usize, f64) -> Result<(), PluginError>,
) -> Result<(Vec<StepRecord>, Tensor, Tensor, f64), PluginError> {
    let facts = model.facts()?;
    let vocab = facts.vocab_size as usize;
    let site = layer_site(&hp.rewrite_site, layer);
    let w0 = model.read_weight(&site)?;
    let mut w = w0.clone();
    let lr = hp.learning_rate(tuned_width(&w0, &site)?);
    let mut adam = Adam::new(w.numel(), lr, hp.weight_decay);

    // P_pre, once, from the weights the case starts from.
    let pre = window_logprobs(model, enc, vocab)?;
    let (win_a, win_b) = enc.kl_window;
    let n_kl = win_b - win_a;

    let n_in = enc.edit_ids.len();
    let n_out = enc.label_ids.len();
    // Logits at n_in − n_out − 1 + j predict label j.
    let first = n_in - n_out - 1;
    let nll: Vec<NllTerm> = enc
        .label_ids
        .iter()
        .enumerate()
        .map(|(j, &token)| NllTerm {
            row: 0,
            position: (first + j) as u32,
            token,
            weight: (hp.kl_factor / n_out as f64) as f32,
        })
        .collect();
    let mut rows = vec![enc.edit_ids.clone()];
    let mut kl = Vec::new();
    if hp.kl_gradient {
        rows.push(enc.instruction_ids.clone());
        for t in 0..n_kl {
            kl.push(KlTerm {
                row: 1,
                position: (win_a + t) as u32,
                ref_logprobs: Tensor::vector(pre[t * vocab..(t + 1) * vocab].to_vec()),
                weight: 1.0 / n_kl as f32,
            });
        }
    }
    let batch = Batch::new(rows, Padding::Right);
    // Only the edited block's weight changes, so the model may run the blocks below once.
    let handle = model.prepare(&batch, layer)?;
    let request = GradRequest {
        forward: ForwardRequest::new(batch, LogitsWanted::None),
        nll: nll.into(),
        kl: kl.into(),
        site_grads: vec![site.as_str().into()].into(),
        prepared: Some(handle).into(),
    };
    let mut steps = Vec::new();
    let mut first_grad = None;
    let result = (|| {
        for step in 0..hp.num_steps {
            let out = model.gradient(&request)?;
            if out.nll_logprobs.len() != n_out {
                return Err(PluginError::internal(format!(
                    "dinm: {} log-probabilities for {n_out} NLL terms",
                    out.nll_logprobs.len()
                )));
            }
            let nll_edit = -out.nll_logprobs.iter().map(|&v| v as f64).sum::<f64>() / n_out as f64;
            let kl_constraint = if hp.kl_gradient {
                out.kl as f64
            } else {
                mean_kl(&pre, &window_logprobs(model, enc, vocab)?, vocab)
            };
            let loss_total = hp.kl_factor * nll_edit + kl_constraint;
            if !loss_total.is_finite() {
                return Err(PluginError::numeric(format!(
                    "dinm: the loss became {loss_total} at step {step}"
                )));
            }
            let sg = out.site_grads.first().ok_or_else(|| {
                PluginError::internal(format!("dinm: no site gradient for {site}"))
            })?;
            let grad = weight_gradient(&sg.input, &sg.output_grad)?;
            let grad_fro_norm = grad
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .sqrt();
            if first_grad.is_none() {
                first_grad = Some(Tensor::new(&w.dims(), grad.clone())?);
            }
            let take = loss_total >= hp.stop_loss;
            if take {
                adam.step(w.as_mut_slice(), &grad);
                if let Some(radius) = hp.norm_constraint {
                    let r = radius as f32;
                    for (v, &v0) in w.as_mut_slice().iter_mut().zip(w0.as_slice()) {
                        *v = v.clamp(v0 - r, v0 + r);
                    }
                }
                model.write_weight(&site, &w)?;
            }
            steps.push(StepRecord {
                step,
                nll_edit,
                kl_constraint,
                loss_total,
                optimizer_step_taken: take,
                grad_fro_norm,
                delta_w_fro_norm_after_step: fro_delta(&w, &w0),
            });
            progress(step, loss_total)?;
            // Without a step nothing changes, so every later step would compute the same loss.
            if !take {
                break;
            }
        }
        Ok(())
    })();
    model.release(handle)?;
    result?;
    let delta: Vec<f32> = w
        .as_slice()
        .iter()
        .zip(w0.as_slice())
        .map(|(&a, &b)| a - b)
        .collect();
    let first_grad = first_grad.unwrap_or_else(|| Tensor::zeros(&w.dims()));
    Ok((steps, first_grad, Tensor::new(&w.dims(), delta)?, lr))
}

fn check_layer(layer: usize, n_layers: usize) -> Result<(), PluginError> {
    if layer >= n_layers {
        return Err(PluginError::invalid(format!(
            "dinm: layer {layer} does not exist (the model has {n_layers} layers)"
        )));
    }
    Ok(())
}

/// Locates every case without editing (`kedit locate`).
pub fn locate_all(
    model: &ModelClient<'_>,
    requests: &[EditRequest],
    hp: &DinmHparams,
) -> Result<serde_json::Value, PluginError> {
    let mut cases = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let texts = CaseTexts::of(r, i)?;
        let enc = encode(model, &texts, hp)?;
        let loc = locate(model, &enc)?;
        cases.push(serde_json::json!({
            "id": texts.id,
            "distances_hidden_states_1_to_L": loc.distances,
            "argmax_hidden_state": loc.layer + 1,
            "layer": loc.layer,
            "site": layer_site(&hp.rewrite_site, loc.layer),
            "n_tokens": [enc.locate_rows[0].len(), enc.locate_rows[1].len()],
        }));
    }
    Ok(serde_json::json!({ "method": "dinm", "cases": cases }))
}

/// Runs DINM on `requests`, one case after another.
pub fn run(
    model: &mut ModelClient<'_>,
    requests: &[EditRequest],
    hp: &DinmHparams,
    progress: &mut ProgressMut<'_>,
) -> Result<DinmTrace, PluginError> {
    let cases: Vec<(String, Encoded)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let texts = CaseTexts::of(r, i)?;
            let enc = encode(model, &texts, hp)
                .map_err(|e| e.context(format!("dinm: tokenizing request '{}'", texts.id)))?;
            Ok((texts.id, enc))
        })
        .collect::<Result<_, PluginError>>()?;
    run_encoded(model, &cases, hp, progress)
}

/// Runs DINM on cases already tokenized (`(id, tokens)`), one after another: each case locates
/// its layer (unless `layers` names them) on the model the previous case left.
pub fn run_encoded(
    model: &mut ModelClient<'_>,
    cases: &[(String, Encoded)],
    hp: &DinmHparams,
    progress: &mut ProgressMut<'_>,
) -> Result<DinmTrace, PluginError> {
    let n_layers = model.facts()?.n_layers as usize;
    for &l in &hp.layers {
        check_layer(l, n_layers)?;
    }
    let per_case = hp.layers.len().max(1) * hp.num_steps;
    let total = (cases.len() * per_case) as u64;
    let mut trace = DinmTrace { cases: Vec::new() };
    for (c, (id, enc)) in cases.iter().enumerate() {
        let started = Instant::now();
        let (location, layers) = if hp.layers.is_empty() {
            let loc = locate(model, enc)
                .map_err(|e| e.context(format!("dinm: locating request '{id}'")))?;
            let l = loc.layer;
            (Some(loc), vec![l])
        } else {
            (None, hp.layers.clone())
        };
        for (k, &layer) in layers.iter().enumerate() {
            let done_before = (c * per_case + k * hp.num_steps) as u64;
            let mut report = |step: usize, loss: f64| -> Result<(), PluginError> {
                let msg = format!("case {id} layer {layer} step {step} loss {loss:.5}");
                if progress.report(done_before + step as u64 + 1, total, msg.as_str().into()) {
                    Ok(())
                } else {
                    Err(PluginError::cancelled())
                }
            };
            let (steps, first_grad, delta, lr) = edit_case(model, enc, layer, hp, &mut report)
                .map_err(|e| e.context(format!("dinm: request '{id}'")))?;
            trace.cases.push(CaseTrace {
                id: id.clone(),
                location: if k == 0 { location.clone() } else { None },
                layer,
                site: layer_site(&hp.rewrite_site, layer),
                templated: enc.templated,
                kl_gradient: hp.kl_gradient,
                lr,
                n_edit_tokens: enc.edit_ids.len(),
                n_label_tokens: enc.label_ids.len(),
                n_instruction_tokens: enc.instruction_ids.len(),
                kl_window: enc.kl_window,
                steps,
                delta_w_fro_norm: delta.norm(),
                seconds: started.elapsed().as_secs_f64(),
                encoded: Some(enc.clone()),
                first_grad: Some(first_grad),
                delta: Some(delta),
            });
        }
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_gradient_sums_outer_products_over_positions() {
        let x = Tensor::new(&[1, 2, 2], vec![1.0, 2.0, 0.0, 1.0]).unwrap();
        let g = Tensor::new(&[1, 2, 1], vec![3.0, -1.0]).unwrap();
        assert_eq!(weight_gradient(&x, &g).unwrap(), vec![3.0, 5.0]);
    }

    #[test]
    fn kl_is_zero_for_equal_distributions_and_positive_otherwise() {
        let a = log_softmax_rows(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], 3);
        assert!(mean_kl(&a, &a, 3).abs() < 1e-12);
        let b = log_softmax_rows(&[3.0, 2.0, 1.0, 0.0, 0.0, 0.0], 3);
        let kl = mean_kl(&a, &b, 3);
        // Row 0: Σ p(lp − lq) with p = softmax(1,2,3), q its reverse; row 1 adds 0.
        let p: Vec<f64> = a[..3].iter().map(|&v| (v as f64).exp()).collect();
        let want = -2.0 * p[0] + 2.0 * p[2];
        assert!((kl - want / 2.0).abs() < 1e-6, "{kl} vs {}", want / 2.0);
    }
}

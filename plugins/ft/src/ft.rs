//! FT-L: constrained fine-tuning of one MLP output projection per chosen layer, as EasyEdit's
//! `ft_main.py::execute_ft` does it. The editor never sees the family: it tokenizes through the
//! model, asks for the loss gradient at the canonical weight site, and forms `dL/dW = Σ gᵀx`
//! from the (input, output-gradient) pairs the model returns.

use kedit_plugin_api::{
    site::layer_site, Batch, EditRequest, GradRequest, ModelClient, NllTerm, Padding, PluginError,
    ProgressMut, Tensor,
};
use serde::Serialize;

use crate::hparams::{FtHparams, Objective};
use kedit_optim::Adam;

/// One optimisation step, as recorded for reports and parity checks.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    pub optimizer_step_taken: bool,
    /// Over all tuned weights together, before the step.
    pub grad_fro_norm: f64,
    pub grad_abs_max: f64,
    /// ‖W − W₀‖ over all tuned weights, after the step (and the clamp).
    pub delta_w_fro_norm_after_step: f64,
}

/// What an FT-L run did.
#[derive(Clone, Debug, Serialize)]
pub struct FtTrace {
    pub sites: Vec<String>,
    pub steps: Vec<StepRecord>,
    /// Token ids of each request's prompt and target.
    pub prompt_ids: Vec<Vec<u32>>,
    pub target_ids: Vec<Vec<u32>>,
    /// The first step's gradient of each tuned weight (`[out, in]`), kept for inspection.
    #[serde(skip)]
    pub first_grads: Vec<Tensor>,
    /// ΔW of each tuned weight.
    #[serde(skip)]
    pub deltas: Vec<Tensor>,
}

/// A request turned into tokens.
struct Encoded {
    prompt: Vec<u32>,
    target: Vec<u32>,
}

fn encode(model: &ModelClient<'_>, request: &EditRequest) -> Result<Encoded, PluginError> {
    let prompt = model.tokenize(&request.prompt, true)?;
    // EasyEdit prepends a space to the target so that it tokenizes as a continuation.
    let target_text = if request.target_new.starts_with(' ') {
        request.target_new.to_string()
    } else {
        format!(" {}", request.target_new)
    };
    let target = model.tokenize(&target_text, false)?;
    if prompt.is_empty() {
        return Err(PluginError::invalid(format!(
            "request '{}': the prompt is empty",
            request.id
        )));
    }
    if target.is_empty() {
        return Err(PluginError::invalid(format!(
            "request '{}': the target '{}' has no tokens",
            request.id, request.target_new
        )));
    }
    Ok(Encoded { prompt, target })
}

/// Builds the padded batch and the NLL terms of the objective for one chunk of requests.
fn objective(chunk: &[Encoded], objective: Objective) -> (Batch, Vec<NllTerm>) {
    let rows: Vec<Vec<u32>> = chunk
        .iter()
        .map(|e| match objective {
            Objective::PromptLast => e.prompt.clone(),
            // Teacher forcing reads target token j after the prompt and targets < j.
            Objective::TargetNew => {
                let mut row = e.prompt.clone();
                row.extend_from_slice(&e.target[..e.target.len() - 1]);
                row
            }
        })
        .collect();
    // EasyEdit pads FT batches on the left.
    let batch = Batch::new(rows, Padding::Left);
    let mut terms = Vec::new();
    let rows_weight = 1.0 / chunk.len() as f32;
    for (r, e) in chunk.iter().enumerate() {
        let w = rows_weight / e.target.len() as f32;
        for (j, &token) in e.target.iter().enumerate() {
            let position = match objective {
                Objective::PromptLast => batch.position(r, e.prompt.len() - 1),
                Objective::TargetNew => batch.position(r, e.prompt.len() - 1 + j),
            };
            terms.push(NllTerm {
                row: r as u32,
                position: position as u32,
                token,
                weight: w,
            });
        }
    }
    (batch, terms)
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
        let xp = &x[p * d_in..(p + 1) * d_in];
        if xp.iter().all(|&v| v == 0.0) {
            continue;
        }
        let gp = &g[p * d_out..(p + 1) * d_out];
        for (o, &go) in gp.iter().enumerate() {
            if go == 0.0 {
                continue;
            }
            let row = &mut dw[o * d_in..(o + 1) * d_in];
            for (r, &xi) in row.iter_mut().zip(xp) {
                *r += go * xi;
            }
        }
    }
    Ok(dw)
}

/// Runs FT-L on `requests`, writing the tuned weights through the model's journal.
pub fn run(
    model: &mut ModelClient<'_>,
    requests: &[EditRequest],
    hp: &FtHparams,
    progress: &mut ProgressMut<'_>,
) -> Result<FtTrace, PluginError> {
    let facts = model.facts()?;
    for &layer in &hp.layers {
        if layer >= facts.n_layers as usize {
            return Err(PluginError::invalid(format!(
                "ft: layer {layer} does not exist (the model has {} layers)",
                facts.n_layers
            )));
        }
    }
    let sites: Vec<String> = hp
        .layers
        .iter()
        .map(|&l| layer_site(&hp.rewrite_site, l))
        .collect();
    let originals: Vec<Tensor> = sites
        .iter()
        .map(|s| model.read_weight(s))
        .collect::<Result<_, _>>()?;
    let mut weights = originals.clone();
    let mut optimizers: Vec<Adam> = weights
        .iter()
        .map(|w| Adam::new(w.numel(), hp.lr, hp.weight_decay))
        .collect();

    let encoded: Vec<Encoded> = requests
        .iter()
        .map(|r| encode(model, r))
        .collect::<Result<_, _>>()?;
    let chunks: Vec<(Batch, Vec<NllTerm>)> = encoded
        .chunks(hp.batch_size)
        .map(|c| objective(c, hp.objective_optimization))
        .collect();
    // Weights below the first tuned layer never change, so the model may compute them once.
    let first_layer = *hp.layers.iter().min().expect("layers checked non-empty");
    let handles: Vec<u64> = chunks
        .iter()
        .map(|(b, _)| model.prepare(b, first_layer))
        .collect::<Result<_, _>>()?;

    let total = (hp.num_steps * chunks.len()) as u64;
    let mut trace = FtTrace {
        sites: sites.clone(),
        steps: Vec::new(),
        prompt_ids: encoded.iter().map(|e| e.prompt.clone()).collect(),
        target_ids: encoded.iter().map(|e| e.target.clone()).collect(),
        first_grads: Vec::new(),
        deltas: Vec::new(),
    };
    let result = (|| {
        for step in 0..hp.num_steps {
            let mut loss_sum = 0.0;
            for (c, (batch, terms)) in chunks.iter().enumerate() {
                let mut forward = kedit_plugin_api::ForwardRequest::new(
                    batch.clone(),
                    kedit_plugin_api::LogitsWanted::None,
                );
                forward.captures.clear();
                let request = GradRequest {
                    forward,
                    nll: terms.clone().into(),
                    kl: Default::default(),
                    site_grads: sites.iter().map(|s| s.as_str().into()).collect(),
                    prepared: Some(handles[c]).into(),
                };
                let out = model.gradient(&request)?;
                let loss = out.loss as f64;
                if !loss.is_finite() {
                    return Err(PluginError::numeric(format!(
                        "ft: the loss became {loss} at step {step}"
                    )));
                }
                loss_sum += loss;
                let grads: Vec<Vec<f32>> = out
                    .site_grads
                    .iter()
                    .map(|sg| weight_gradient(&sg.input, &sg.output_grad))
                    .collect::<Result<_, _>>()?;
                let (mut sq, mut amax) = (0f64, 0f64);
                for g in &grads {
                    for &v in g {
                        sq += (v as f64) * (v as f64);
                        amax = amax.max((v as f64).abs());
                    }
                }
                if trace.first_grads.is_empty() {
                    trace.first_grads = grads
                        .iter()
                        .zip(&weights)
                        .map(|(g, w)| Tensor::new(&w.dims(), g.clone()))
                        .collect::<Result<_, _>>()?;
                }
                let take_step = loss >= hp.stop_loss;
                if take_step {
                    for ((w, g), opt) in weights.iter_mut().zip(&grads).zip(&mut optimizers) {
                        opt.step(w.as_mut_slice(), g);
                    }
                }
                if let Some(radius) = hp.norm_constraint {
                    let r = radius as f32;
                    for (w, w0) in weights.iter_mut().zip(&originals) {
                        for (v, &v0) in w.as_mut_slice().iter_mut().zip(w0.as_slice()) {
                            *v = v.clamp(v0 - r, v0 + r);
                        }
                    }
                }
                if take_step || hp.norm_constraint.is_some() {
                    for (site, w) in sites.iter().zip(&weights) {
                        model.write_weight(site, w)?;
                    }
                }
                let mut dsq = 0f64;
                for (w, w0) in weights.iter().zip(&originals) {
                    for (&v, &v0) in w.as_slice().iter().zip(w0.as_slice()) {
                        let d = (v - v0) as f64;
                        dsq += d * d;
                    }
                }
                trace.steps.push(StepRecord {
                    step,
                    loss,
                    optimizer_step_taken: take_step,
                    grad_fro_norm: sq.sqrt(),
                    grad_abs_max: amax,
                    delta_w_fro_norm_after_step: dsq.sqrt(),
                });
                let done = (step * chunks.len() + c + 1) as u64;
                if !progress.report(
                    done,
                    total,
                    format!("step {step} loss {loss:.4}").as_str().into(),
                ) {
                    return Err(PluginError::cancelled());
                }
            }
            if loss_sum / (chunks.len() as f64) < hp.stop_loss {
                break;
            }
        }
        Ok(())
    })();
    for h in handles {
        model.release(h)?;
    }
    result?;
    trace.deltas = weights
        .iter()
        .zip(&originals)
        .map(|(w, w0)| {
            let d: Vec<f32> = w
                .as_slice()
                .iter()
                .zip(w0.as_slice())
                .map(|(&a, &b)| a - b)
                .collect();
            Tensor::new(&w.dims(), d)
        })
        .collect::<Result<_, _>>()?;
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_gradient_sums_outer_products_over_positions() {
        // Two positions: x = [1, 2], g = [3]; x = [0, 1], g = [−1] → dW = [[3, 5]].
        let x = Tensor::new(&[1, 2, 2], vec![1.0, 2.0, 0.0, 1.0]).unwrap();
        let g = Tensor::new(&[1, 2, 1], vec![3.0, -1.0]).unwrap();
        assert_eq!(weight_gradient(&x, &g).unwrap(), vec![3.0, 5.0]);
    }

    #[test]
    fn prompt_last_scores_every_target_token_at_the_last_prompt_position() {
        let chunk = [
            Encoded {
                prompt: vec![5, 6, 7],
                target: vec![8, 9],
            },
            Encoded {
                prompt: vec![1],
                target: vec![2],
            },
        ];
        let (batch, terms) = objective(&chunk, Objective::PromptLast);
        assert_eq!(batch.padded_len(), 3);
        let got: Vec<(u32, u32, u32, f32)> = terms
            .iter()
            .map(|t| (t.row, t.position, t.token, t.weight))
            .collect();
        assert_eq!(got, vec![(0, 2, 8, 0.25), (0, 2, 9, 0.25), (1, 2, 2, 0.5)]);
        let (batch, terms) = objective(&chunk, Objective::TargetNew);
        assert_eq!(batch.rows[0].as_slice(), &[5, 6, 7, 8]);
        let got: Vec<(u32, u32, u32)> =
            terms.iter().map(|t| (t.row, t.position, t.token)).collect();
        assert_eq!(got, vec![(0, 2, 8), (0, 3, 9), (1, 3, 2)]);
    }
}

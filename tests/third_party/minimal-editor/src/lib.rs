//! `onestep`: a minimal but real kedit editing method, as a third party would write it.
//!
//! For each request (prompt, target) it changes one MLP down projection `W` (`[out, in]`, the
//! canonical weight site `layer.{L}.mlp.down`) by a few *normalised gradient steps* on the
//! negative log-likelihood of the target continuation:
//!
//! ```text
//! G  = dL/dW = Σ_{b,s} g[b,s]ᵀ x[b,s]      (x: input of the projection, g: dL/d its output)
//! W ← W − step_norm · G / ‖G‖_F
//! ```
//!
//! The model computes `x` and `g` for it (`GradRequest::site_grads`); the editor never links a
//! model, never sees a family-specific tensor name, and every weight write goes through the
//! model's journal, so the host can undo the edit.

use abi_stable::std_types::{RString, RVec};
use kedit_plugin_api::{
    editor_box, kind, Batch, EditReport, EditRequest, Editor, EditorBox, ForwardRequest,
    GradRequest, LogitsWanted, MethodInfo, ModelClient, NllTerm, Padding, PluginError, PluginInfo,
    ProgressMut, ResultExt, Tensor, API_LEVEL,
};
use serde::Deserialize;

/// The method's hyper-parameters. The host merges the defaults below with the user's TOML
/// (`--hparams`) and hands them over as a JSON object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hparams {
    /// The layer whose MLP down projection is edited.
    layer: usize,
    /// At most this many gradient steps per request.
    steps: usize,
    /// Frobenius norm of each step.
    step_norm: f32,
    /// Stop early once the target's probability reaches this.
    stop_prob: f32,
}

const DEFAULT_HPARAMS: &str = r#"{"layer": 5, "steps": 6, "step_norm": 2.0, "stop_prob": 0.9}"#;

fn info() -> PluginInfo {
    PluginInfo {
        kind: kind::EDITOR,
        name: "onestep".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_level: API_LEVEL,
        description: "normalised gradient steps on one MLP down projection".into(),
        families: RVec::new(),
        methods: vec![MethodInfo {
            name: "onestep".into(),
            description: "edits a fact with a few normalised gradient steps on layer.L.mlp.down"
                .into(),
            default_hparams_json: DEFAULT_HPARAMS.into(),
            family_defaults: RVec::new(),
        }]
        .into(),
        capabilities: RVec::new(),
    }
}

/// The tokens of one request: the prompt, and the target continuation to learn.
struct Example {
    prompt: Vec<u32>,
    target: Vec<u32>,
}

impl Example {
    fn new(model: &ModelClient<'_>, request: &EditRequest) -> Result<Self, PluginError> {
        let prompt = model.tokenize(request.prompt.as_str(), true)?;
        // The target continues the prompt after a space, as in CounterFact.
        let target_text = request.target_new.as_str();
        let target_text = if target_text.starts_with(' ') || request.prompt.ends_with(' ') {
            target_text.to_string()
        } else {
            format!(" {target_text}")
        };
        let target = model.tokenize(&target_text, false)?;
        if prompt.is_empty() || target.is_empty() {
            return Err(PluginError::invalid(format!(
                "request {:?}: empty prompt or target",
                request.id.as_str()
            )));
        }
        Ok(Self { prompt, target })
    }

    /// One row: the prompt followed by all but the last target token; the loss asks each
    /// position from the prompt's last token on to predict the next target token.
    fn grad_request(&self, site: &str) -> GradRequest {
        let mut row = self.prompt.clone();
        row.extend_from_slice(&self.target[..self.target.len() - 1]);
        let nll = self
            .target
            .iter()
            .enumerate()
            .map(|(j, &token)| NllTerm {
                row: 0,
                position: (self.prompt.len() - 1 + j) as u32,
                token,
                weight: 1.0,
            })
            .collect::<Vec<_>>();
        GradRequest {
            forward: ForwardRequest::new(Batch::new(vec![row], Padding::Right), LogitsWanted::None),
            nll: nll.into(),
            kl: RVec::new(),
            site_grads: vec![RString::from(site)].into(),
            prepared: None.into(),
        }
    }
}

/// `Σ_{b,s} g[b,s]ᵀ x[b,s]` as an `[out, in]` buffer.
fn weight_gradient(input: &Tensor, output_grad: &Tensor) -> Result<Vec<f32>, PluginError> {
    let (xd, gd) = (input.dims(), output_grad.dims());
    if xd.len() != 3 || gd.len() != 3 || xd[..2] != gd[..2] {
        return Err(PluginError::internal(format!(
            "site gradient shapes {xd:?} and {gd:?} do not match [batch, seq, width]"
        )));
    }
    let (n_in, n_out) = (xd[2], gd[2]);
    let mut grad = vec![0f32; n_out * n_in];
    let (x, g) = (input.as_slice(), output_grad.as_slice());
    for t in 0..xd[0] * xd[1] {
        let xt = &x[t * n_in..(t + 1) * n_in];
        for (o, &go) in g[t * n_out..(t + 1) * n_out].iter().enumerate() {
            if go != 0.0 {
                for (w, &xi) in grad[o * n_in..(o + 1) * n_in].iter_mut().zip(xt) {
                    *w += go * xi;
                }
            }
        }
    }
    Ok(grad)
}

struct OneStep;

impl Editor for OneStep {
    fn edit(
        &mut self,
        model: &mut ModelClient<'_>,
        method: &str,
        requests: &[EditRequest],
        hparams_json: &str,
        progress: &mut ProgressMut<'_>,
    ) -> Result<EditReport, PluginError> {
        if method != "onestep" {
            return Err(PluginError::invalid(format!("unknown method '{method}'")));
        }
        let hp: Hparams = serde_json::from_str(hparams_json)
            .map_err(|e| PluginError::invalid(format!("onestep hparams: {e}")))?;
        let facts = model.facts()?;
        if hp.layer >= facts.n_layers as usize {
            return Err(PluginError::invalid(format!(
                "layer {} does not exist: the model has {} layers",
                hp.layer, facts.n_layers
            )));
        }
        if !(hp.step_norm.is_finite() && hp.step_norm > 0.0) {
            return Err(PluginError::invalid("step_norm must be a positive number"));
        }
        let site = format!("layer.{}.mlp.down", hp.layer);

        let total = (requests.len() * hp.steps.max(1)) as u64;
        let mut per_request = Vec::new();
        for (i, request) in requests.iter().enumerate() {
            let example = Example::new(model, request)
                .with_context(|| format!("request {}", request.id.as_str()))?;
            let grad_request = example.grad_request(&site);
            let mut losses = Vec::new();
            let mut probs = Vec::new();
            let mut steps_taken = 0;
            loop {
                let out = model.gradient(&grad_request).context("gradient")?;
                if !out.loss.is_finite() {
                    // The host rolls the whole edit back on an error.
                    return Err(PluginError::numeric(format!("loss is {}", out.loss)));
                }
                let prob = out.nll_logprobs.iter().sum::<f32>().exp();
                losses.push(out.loss);
                probs.push(prob);
                if steps_taken == hp.steps || prob >= hp.stop_prob {
                    break;
                }
                let sg = out
                    .site_grads
                    .first()
                    .ok_or_else(|| PluginError::internal("the model returned no site gradient"))?;
                let grad = weight_gradient(&sg.input, &sg.output_grad)?;
                let norm = grad
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>()
                    .sqrt();
                if !(norm.is_finite() && norm > 0.0) {
                    return Err(PluginError::numeric(format!("gradient norm is {norm}")));
                }
                // W ← W − step_norm · G / ‖G‖: a journaled write of the whole projection.
                let mut w = model.read_weight(&site)?;
                let scale = hp.step_norm / norm as f32;
                for (wv, gv) in w.as_mut_slice().iter_mut().zip(&grad) {
                    *wv -= scale * gv;
                }
                model.write_weight(&site, &w)?;
                steps_taken += 1;
                let done = (i * hp.steps.max(1) + steps_taken) as u64;
                let message = format!("request {}: loss {:.3}", i + 1, out.loss);
                if !progress.report(done, total, message.as_str().into()) {
                    return Err(PluginError::cancelled());
                }
            }
            per_request.push(serde_json::json!({
                "id": request.id.as_str(),
                "steps": steps_taken,
                "losses": losses,
                "target_prob_before": probs.first(),
                "target_prob_after": probs.last(),
            }));
        }
        let details = serde_json::json!({ "site": site, "requests": per_request });
        Ok(EditReport {
            method: "onestep".into(),
            requests: requests.len() as u32,
            details_json: details.to_string().into(),
        })
    }
}

fn new_editor() -> Result<EditorBox, PluginError> {
    Ok(editor_box(OneStep))
}

kedit_plugin_api::export_plugin! {
    info: info,
    new_editor: new_editor,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_gradient_is_the_sum_of_outer_products() {
        // batch 1, seq 2, in 2, out 3
        let x = Tensor::new(&[1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let g = Tensor::new(&[1, 2, 3], vec![1.0, 0.0, -1.0, 0.5, 1.0, 0.0]).unwrap();
        let grad = weight_gradient(&x, &g).unwrap();
        // G[o][i] = Σ_t g[t][o] x[t][i]
        assert_eq!(grad, vec![2.5, 4.0, 3.0, 4.0, -1.0, -2.0]);
    }

    #[test]
    fn default_hparams_parse() {
        let hp: Hparams = serde_json::from_str(DEFAULT_HPARAMS).unwrap();
        assert_eq!(hp.layer, 5);
    }
}

//! The logit lens: what the residual stream after each block decodes to, through the model's
//! own final norm and head. One batched forward pass: row 0 decodes the input embedding and
//! row l + 1 the stream leaving block l, each by replacing the last block's output
//! (`layer.{L-1}.resid_post`, which only the final norm reads) with that stream.

use kedit_plugin_api::{
    Batch, ForwardRequest, Intervention, InterventionMode, LogitsWanted, ModelClient, Padding,
    PluginError, Tensor,
};
use serde::{Deserialize, Serialize};

/// One token and its probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    pub token: u32,
    pub prob: f32,
}

/// The top tokens of one stream at every position.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LensRow {
    /// `embed`, or `layer N` for the stream leaving block N.
    pub stream: String,
    /// `top[position]`, best first.
    pub top: Vec<Vec<Ranked>>,
}

/// The lens of `ids` with the `k` best tokens per cell.
pub fn logit_lens(
    client: &ModelClient<'_>,
    ids: &[u32],
    k: usize,
) -> Result<Vec<LensRow>, PluginError> {
    let facts = client.facts()?;
    let (n_layers, d) = (facts.n_layers as usize, facts.d_model as usize);
    let seq = ids.len();
    if seq == 0 {
        return Err(PluginError::invalid(
            "the logit lens needs a prompt of at least one token",
        ));
    }
    let mut capture = ForwardRequest::new(
        Batch::new(vec![ids.to_vec()], Padding::Right),
        LogitsWanted::None,
    );
    let mut sites = vec!["embed".to_string()];
    sites.extend((0..n_layers).map(|l| format!("layer.{l}.resid_post")));
    capture.captures = sites.iter().map(|s| s.as_str().into()).collect();
    let streams = client.forward(&capture)?.captures;

    let last = format!("layer.{}.resid_post", n_layers - 1);
    let rows = n_layers + 1;
    let mut req = ForwardRequest::new(
        Batch::new(vec![ids.to_vec(); rows], Padding::Right),
        LogitsWanted::All,
    );
    let mut interventions = Vec::new();
    for (row, stream) in streams.iter().enumerate().take(n_layers) {
        for p in 0..seq {
            let v = stream.as_slice()[p * d..(p + 1) * d].to_vec();
            interventions.push(Intervention::fixed(
                &last,
                row,
                p,
                InterventionMode::Replace,
                Tensor::vector(v),
            ));
        }
    }
    req.interventions = interventions.into();
    let logits = client
        .forward(&req)?
        .logits
        .into_option()
        .ok_or_else(|| PluginError::internal("the forward pass returned no logits"))?;
    let vocab = facts.vocab_size as usize;
    let all = logits.as_slice();
    Ok((0..rows)
        .map(|row| LensRow {
            stream: if row == 0 {
                "embed".into()
            } else {
                format!("layer {}", row - 1)
            },
            top: (0..seq)
                .map(|p| {
                    top_k(
                        &all[(row * seq + p) * vocab..(row * seq + p + 1) * vocab],
                        k,
                    )
                })
                .collect(),
        })
        .collect())
}

/// The `k` most probable tokens of a logit row (softmax in f64).
pub fn top_k(logits: &[f32], k: usize) -> Vec<Ranked> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let z: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        logits[b].total_cmp(&logits[a])
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.into_iter()
        .map(|i| Ranked {
            token: i as u32,
            prob: ((logits[i] as f64 - max).exp() / z) as f32,
        })
        .collect()
}

//! Checkpoint layouts with fused tensors (GLM's `gate_up_proj`, ChatGLM's `query_key_value` and
//! `dense_h_to_4h`, Baichuan's `W_pack`): one HF tensor whose consecutive row blocks are
//! separate canonical sites. The runtime keeps each block as its own `[out, in]` tensor, so that
//! reading, writing, journaling and tapping a site (`layer.i.attn.k` = rows of `W_pack`) work as
//! for unfused families; export concatenates the blocks back into the HF tensor.

use candle_core::{Device, Tensor};
use kedit_plugin_api::WeightSite;

use crate::checkpoint::SafetensorsCheckpoint;
use crate::error::{invalid, Context, Result};
use crate::weights::WeightStore;

/// Where a block of rows lives in the runtime.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Site(WeightSite),
    Bias(WeightSite),
    /// A family-internal tensor (norm scales, buffers kept for export).
    Named(String),
}

/// One HF tensor: its name, its trailing dims (`[in]` for a matrix, `[]` for a vector) and
/// its row blocks in order.
#[derive(Clone, Debug)]
pub struct Spec {
    pub hf: String,
    pub inner: Vec<usize>,
    pub parts: Vec<(Target, usize)>,
}

impl Spec {
    /// An unfused tensor of `shape` (outermost first).
    pub fn plain(target: Target, hf: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            hf: hf.into(),
            inner: shape[1..].to_vec(),
            parts: vec![(target, shape[0])],
        }
    }

    /// A fused tensor: row blocks `parts` (target, rows) stacked along dim 0.
    pub fn fused(hf: impl Into<String>, inner: &[usize], parts: Vec<(Target, usize)>) -> Self {
        Self {
            hf: hf.into(),
            inner: inner.to_vec(),
            parts,
        }
    }

    /// The HF tensor's full shape.
    pub fn shape(&self) -> Vec<usize> {
        let mut s = vec![self.parts.iter().map(|(_, n)| n).sum()];
        s.extend(&self.inner);
        s
    }
}

fn store(weights: &mut WeightStore, target: &Target, t: Tensor) {
    match target {
        Target::Site(s) => weights.insert_site(*s, t),
        Target::Bias(s) => weights.insert_bias(*s, t),
        Target::Named(n) => weights.insert_named(n.clone(), t),
    }
}

/// Reads every tensor of `specs` (shape-checked, errors name the file and the tensor) and
/// splits fused ones into their blocks.
pub fn load(
    specs: &[Spec],
    ckpt: &SafetensorsCheckpoint,
    tied_head: bool,
    device: &Device,
) -> Result<WeightStore> {
    let mut weights = WeightStore::new(tied_head);
    for spec in specs {
        let shape = spec.shape();
        let data = ckpt.tensor_f32(&spec.hf, &shape)?;
        let t = Tensor::from_vec(data, shape.as_slice(), device)
            .with_context(|| format!("placing '{}' on {device:?}", spec.hf))?;
        if spec.parts.len() == 1 {
            store(&mut weights, &spec.parts[0].0, t);
            continue;
        }
        let mut start = 0;
        for (target, rows) in &spec.parts {
            let block = t.narrow(0, start, *rows)?.contiguous()?;
            store(&mut weights, target, block);
            start += rows;
        }
    }
    Ok(weights)
}

fn read(weights: &WeightStore, target: &Target) -> Result<Tensor> {
    Ok(match target {
        Target::Site(s) => weights.site(*s)?.clone(),
        Target::Bias(s) => weights
            .bias(*s)
            .cloned()
            .ok_or_else(|| invalid(format!("bias of '{s}' is missing")))?,
        Target::Named(n) => weights.named(n)?.clone(),
    })
}

/// The HF tensors, fused ones re-fused from their (possibly edited) blocks.
pub fn to_hf(specs: &[Spec], weights: &WeightStore) -> Result<Vec<(String, Tensor)>> {
    specs
        .iter()
        .map(|spec| {
            let blocks = spec
                .parts
                .iter()
                .map(|(target, _)| read(weights, target))
                .collect::<Result<Vec<_>>>()?;
            let t = if blocks.len() == 1 {
                blocks.into_iter().next().expect("one block")
            } else {
                Tensor::cat(&blocks, 0)?
            };
            Ok((spec.hf.clone(), t))
        })
        .collect()
}

/// Basic sanity of a family's sizes, with the config file in the message.
#[allow(clippy::manual_is_multiple_of)]
pub fn check_dims(dims: &crate::arch::Dims, origin: &str) -> Result<()> {
    let bad = |what: String| invalid(format!("{origin}: {what}"));
    if dims.n_layers == 0 || dims.d_model == 0 || dims.n_heads == 0 || dims.vocab_size == 0 {
        return Err(bad(format!("degenerate sizes {dims:?}")));
    }
    if dims.n_kv_heads == 0 || dims.n_heads % dims.n_kv_heads != 0 {
        return Err(bad(format!(
            "{} attention heads cannot share {} key/value heads evenly",
            dims.n_heads, dims.n_kv_heads
        )));
    }
    Ok(())
}

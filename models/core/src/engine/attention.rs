//! Causal grouped-query self-attention over a padded batch, optionally continuing a KV cache.

use candle_core::Tensor;

use super::kv_cache::KvCache;
use super::ops::{softmax_last_dim, Path};
use super::rope::{Rope, RopeTables};

/// Shapes of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// What every layer of one call shares: positions, mask and the zeroing of keyless queries.
pub struct AttentionInputs<'a> {
    pub rope: Option<(&'a Rope, &'a RopeTables)>,
    /// Additive `[batch, 1, seq, keys]`.
    pub mask: Option<&'a Tensor>,
    /// `[batch, 1, seq, 1]` of 0/1.
    pub query_has_key: Option<&'a Tensor>,
    /// Added to the scaled scores before the mask, broadcast to `[batch, heads, seq, keys]`
    /// (ALiBi's `[1, heads, 1, keys]`).
    pub score_bias: Option<&'a Tensor>,
    pub path: Path,
}

/// `q: [batch, seq, heads·hd]`, `k`/`v`: `[batch, seq, kv_heads·hd]` → `[batch, seq, heads·hd]`,
/// and the attention probabilities `[batch, heads, seq, keys]` (for the `attn_probs` capture).
///
/// With `cache = (cache, layer)`, this call's keys/values (after RoPE) are appended to the
/// layer's cache and attention runs over everything cached. Query head h
/// uses kv head `h / (heads / kv_heads)`; rather than repeating the kv heads, the queries of one
/// group are stacked along the sequence axis so each kv head is read once per matmul.
pub fn attention(
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inputs: &AttentionInputs<'_>,
    cache: Option<(&mut KvCache, usize)>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let (b, s, _) = q.dims3()?;
    let group = n_heads / n_kv_heads;
    let q = q.reshape((b, s, n_heads, head_dim))?.transpose(1, 2)?;
    let k = k.reshape((b, s, n_kv_heads, head_dim))?.transpose(1, 2)?;
    let v = v.reshape((b, s, n_kv_heads, head_dim))?.transpose(1, 2)?;
    let (q, k) = match inputs.rope {
        Some((rope, tables)) => (
            rope.apply(&q, tables, inputs.path)?,
            rope.apply(&k, tables, inputs.path)?,
        ),
        None => (q, k),
    };
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let (k, v) = match cache {
        Some((cache, layer)) => cache.append(layer, k, v)?,
        None => (k, v),
    };
    let keys = k.dim(2)?;
    let q = q
        .contiguous()?
        .reshape((b, n_kv_heads, group * s, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = q
        .matmul(&k.t()?)?
        .reshape((b, n_heads, s, keys))?
        .affine(scale, 0.0)?;
    let scores = match inputs.score_bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let scores = match inputs.mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores, inputs.path)?;
    let probs = match inputs.query_has_key {
        Some(m) => probs.broadcast_mul(m)?,
        None => probs,
    };
    let out = probs
        .reshape((b, n_kv_heads, group * s, keys))?
        .matmul(&v)?
        .reshape((b, n_heads, s, head_dim))?;
    let out = out.transpose(1, 2)?.reshape((b, s, n_heads * head_dim))?;
    Ok((out, probs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::layout::RowLayout;
    use candle_core::{Device, D};

    /// A left-padded row must give exactly zero at its pads and the same values as the row
    /// alone at its real tokens.
    #[test]
    fn left_pads_get_zero_and_real_tokens_are_unaffected() {
        let dev = Device::Cpu;
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let q = Tensor::randn(0f32, 1., (1, 3, 32), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 3, 16), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 3, 16), &dev).unwrap();
        let alone = {
            let layout = RowLayout::single(3, 0);
            let mask = layout.attention_mask(&dev).unwrap();
            let inputs = AttentionInputs {
                rope: None,
                mask: mask.as_ref(),
                query_has_key: None,
                score_bias: None,
                path: Path::Inference,
            };
            attention(shape, &q, &k, &v, &inputs, None).unwrap().0
        };
        let pad = |t: &Tensor| {
            Tensor::cat(
                &[
                    &Tensor::ones((1, 2, t.dim(2).unwrap()), t.dtype(), &dev).unwrap(),
                    t,
                ],
                1,
            )
            .unwrap()
        };
        let layout = RowLayout {
            batch: 1,
            seq: 5,
            offsets: vec![2],
            lengths: vec![3],
            past: 0,
            past_pads: vec![0],
        };
        let mask = layout.attention_mask(&dev).unwrap();
        let has_key = layout.query_has_key(&dev).unwrap();
        for path in [Path::Inference, Path::Gradient] {
            let inputs = AttentionInputs {
                rope: None,
                mask: mask.as_ref(),
                query_has_key: has_key.as_ref(),
                score_bias: None,
                path,
            };
            let out = attention(shape, &pad(&q), &pad(&k), &pad(&v), &inputs, None)
                .unwrap()
                .0;
            let pads = out
                .narrow(1, 0, 2)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(pads.to_scalar::<f32>().unwrap(), 0.0);
            let real = out.narrow(1, 2, 3).unwrap();
            let diff = (real - &alone)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(D::Minus1)
                .unwrap();
            let diff = diff
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{diff}");
        }
    }
}

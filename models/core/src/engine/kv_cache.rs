//! The per-call key/value cache of generation. It belongs to the call, never to the model, so
//! that concurrent probes and generations share one set of weights.

use candle_core::Tensor;

#[derive(Clone)]
pub struct KvCache {
    /// Per layer: keys and values after RoPE, `[batch, kv_heads, cached, head_dim]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends this call's keys and values of `layer` and returns everything cached for it.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let merged = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(merged.clone());
        Ok(merged)
    }

    /// Records that a call of `n` new tokens went through every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

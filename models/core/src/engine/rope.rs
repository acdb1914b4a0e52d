//! Rotary position embeddings.
//!
//! Pair `i` of a head (i < rot/2) is rotated by `pos · theta^(−2i/rot)`:
//! `(a, b) → (a·cos − b·sin, b·cos + a·sin)`. Which two dimensions form a pair is the style:
//! HF safetensors checkpoints use half-split pairs `(i, i + rot/2)` ("rotate_half"), while
//! llama.cpp permutes the Q/K rows of `llama`-architecture GGUF files so that the same rotation
//! acts on interleaved pairs `(2i, 2i+1)`. Applying the wrong style still gives plausible text
//! but logits that are off by several units, so the style is part of every family's config.

use std::sync::Arc;

use candle_core::{Device, Tensor, D};

use super::ops::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(i, i + rot/2)`: GPT-NeoX / HF `rotate_half`.
    HalfSplit,
    /// Pairs `(2i, 2i + 1)`: GPT-J, llama.cpp's permuted `llama` GGUF rows, ChatGLM.
    Interleaved,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    pub theta: f64,
    /// Rotated dimensions per head (the first `rotary_dim`; the rest pass through).
    pub rotary_dim: usize,
    pub head_dim: usize,
}

/// cos/sin for every token of a call, `[batch, seq, rotary_dim/2]`.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    /// The same values in host memory, for the fused rotation (which would otherwise copy
    /// them out of the tensors for every query and key of every layer).
    pub(crate) cos_host: Arc<Vec<f32>>,
    pub(crate) sin_host: Arc<Vec<f32>>,
}

impl Rope {
    /// Computes the tables for `positions` (`[batch·seq]`, row-major) as HF does, in f32:
    /// `inv_freq = 1 / theta^(2i/rot)`, angle = `pos · inv_freq`.
    pub fn tables(
        &self,
        positions: &[u32],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> candle_core::Result<RopeTables> {
        let half = self.rotary_dim / 2;
        let theta = self.theta as f32;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / self.rotary_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_slice(&cos, (batch, seq, half), device)?,
            sin: Tensor::from_slice(&sin, (batch, seq, half), device)?,
            cos_host: Arc::new(cos),
            sin_host: Arc::new(sin),
        })
    }

    /// Rotates `x: [batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: &Tensor, t: &RopeTables, path: Path) -> candle_core::Result<Tensor> {
        if self.rotary_dim == self.head_dim {
            return self.rotate(x, t, path);
        }
        let rotated = self.rotate(&x.narrow(D::Minus1, 0, self.rotary_dim)?, t, path)?;
        let pass = x.narrow(D::Minus1, self.rotary_dim, self.head_dim - self.rotary_dim)?;
        Tensor::cat(&[rotated, pass.contiguous()?], D::Minus1)
    }

    fn rotate(&self, x: &Tensor, t: &RopeTables, path: Path) -> candle_core::Result<Tensor> {
        match path {
            Path::Inference => {
                let x = x.contiguous()?;
                match self.style {
                    RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x, &t.cos, &t.sin),
                    RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &t.cos, &t.sin),
                }
            }
            Path::Gradient if super::fused::applies(x) => {
                super::fused::rope(&x.contiguous()?, t, self.style)
            }
            Path::Gradient => self.rotate_differentiable(x, t),
        }
    }

    /// The same rotation from narrow/cat/mul only, so that autograd sees every step.
    fn rotate_differentiable(&self, x: &Tensor, t: &RopeTables) -> candle_core::Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let half = d / 2;
        // [batch, 1, seq, half] broadcasts over heads.
        let cos = t.cos.unsqueeze(1)?;
        let sin = t.sin.unsqueeze(1)?;
        match self.style {
            RopeStyle::HalfSplit => {
                let a = x.narrow(D::Minus1, 0, half)?;
                let bb = x.narrow(D::Minus1, half, half)?;
                let ra = (a.broadcast_mul(&cos)? - bb.broadcast_mul(&sin)?)?;
                let rb = (bb.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
                Tensor::cat(&[ra, rb], D::Minus1)
            }
            RopeStyle::Interleaved => {
                let pairs = x.contiguous()?.reshape((b, h, s, half, 2))?;
                let a = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
                let bb = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
                let ra = (a.broadcast_mul(&cos)? - bb.broadcast_mul(&sin)?)?;
                let rb = (bb.broadcast_mul(&cos)? + a.broadcast_mul(&sin)?)?;
                Tensor::stack(&[ra, rb], D::Minus1)?.reshape((b, h, s, d))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_util::max_diff;

    #[test]
    fn fused_and_differentiable_rotations_are_identical() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 16), &dev).unwrap();
        let positions: Vec<u32> = vec![0, 1, 2, 3, 4, 7, 0, 0, 1, 2];
        for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
            let rope = Rope {
                style,
                theta: 10000.0,
                rotary_dim: 16,
                head_dim: 16,
            };
            let t = rope.tables(&positions, 2, 5, &dev).unwrap();
            let a = rope.apply(&x, &t, Path::Inference).unwrap();
            let b = rope.apply(&x, &t, Path::Gradient).unwrap();
            assert_eq!(max_diff(&a, &b), 0.0, "{style:?}");
        }
    }
}

//! LayerNorm (with bias) and GPT-2's `gelu_new`, each in an inference and a differentiable form.
//! candle's fused `layer_norm` has no backward (it silently yields no gradient), so the gradient
//! path composes it from differentiable primitives.

use candle_core::{Tensor, D};

use super::ops::Path;

/// `(x − mean) · rsqrt(var + eps) · w + b` over the last dimension (biased variance).
pub fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    path: Path,
) -> candle_core::Result<Tensor> {
    match path {
        Path::Inference => candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32),
        Path::Gradient => {
            let mean = x.mean_keepdim(D::Minus1)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            let inv_std = (var + eps)?.sqrt()?.recip()?;
            centered
                .broadcast_mul(&inv_std)?
                .broadcast_mul(w)?
                .broadcast_add(b)
        }
    }
}

/// GPT-2's `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_new(x: &Tensor, path: Path) -> candle_core::Result<Tensor> {
    match path {
        // candle's `gelu` is this tanh approximation.
        Path::Inference => x.gelu(),
        Path::Gradient => {
            let c = (2.0f64 / std::f64::consts::PI).sqrt();
            let cube = (x.sqr()? * x)?;
            let inner = (x + cube.affine(0.044715, 0.0)?)?.affine(c, 0.0)?;
            let t = (inner.tanh()? + 1.0)?;
            (x * t)?.affine(0.5, 0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_util::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn fused_and_manual_forms_agree_and_the_manual_ones_have_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., (2, 5, 64), &dev).unwrap()).unwrap();
        let w = Tensor::randn(1f32, 0.1, 64, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 64, &dev).unwrap();
        let a = layer_norm(x.as_tensor(), &w, &b, 1e-5, Path::Inference).unwrap();
        let m = layer_norm(x.as_tensor(), &w, &b, 1e-5, Path::Gradient).unwrap();
        assert!(max_diff(&a, &m) < 1e-5);
        let g = m.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        let a = gelu_new(x.as_tensor(), Path::Inference).unwrap();
        let m = gelu_new(x.as_tensor(), Path::Gradient).unwrap();
        assert!(max_diff(&a, &m) < 1e-5);
        let g = m.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    }
}

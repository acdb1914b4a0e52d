//! Normalisation and softmax in two forms: candle's fused kernels for inference, and for the
//! gradient path kedit's own fused ops with a backward (`fused.rs`, f32 on the CPU) or else
//! compositions of differentiable primitives. candle's fused `rms_norm` / `softmax_last_dim`
//! have no backward and silently yield *no* gradient, so the gradient path must never use them;
//! tests check that all forms agree.

use candle_core::{Tensor, D};

/// Which implementation an operation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no autograd.
    Inference,
    /// Differentiable compositions.
    Gradient,
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, path: Path) -> candle_core::Result<Tensor> {
    match path {
        Path::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32),
        Path::Gradient if super::fused::applies(x) => super::fused::rms_norm(x, w, eps),
        Path::Gradient => {
            let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
            let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
            x.broadcast_mul(&inv_rms)?.broadcast_mul(w)
        }
    }
}

/// `silu(gate) · up` (SwiGLU's hidden layer): one fused op on f32 CPU tensors in either path,
/// candle's two ops otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if super::fused::applies(gate) && super::fused::applies(up) {
        super::fused::swiglu(gate, up)
    } else {
        gate.silu()? * up
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor, path: Path) -> candle_core::Result<Tensor> {
    match path {
        Path::Inference => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Path::Gradient if super::fused::applies(x) => super::fused::softmax_last_dim(x),
        Path::Gradient => {
            // The shift by the (detached) maximum changes nothing mathematically, so its
            // gradient is dropped rather than routed through `max`.
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            let sum = e.sum_keepdim(D::Minus1)?;
            e.broadcast_div(&sum)
        }
    }
}

/// Differentiable `log softmax` over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// `log softmax` of one row of logits on the host, accumulated in f64.
pub fn log_softmax_row(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_sum = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&v| v as f64 - max - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_util::max_diff;
    use candle_core::{Device, Tensor};

    #[test]
    fn fused_and_manual_forms_agree() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3., (2, 5, 64), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 64, &dev).unwrap();
        let a = rms_norm(&x, &w, 1e-5, Path::Inference).unwrap();
        let b = rms_norm(&x, &w, 1e-5, Path::Gradient).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let a = softmax_last_dim(&x, Path::Inference).unwrap();
        let b = softmax_last_dim(&x, Path::Gradient).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let c = log_softmax_last_dim(&x).unwrap().exp().unwrap();
        assert!(max_diff(&a, &c) < 1e-6);
    }
}

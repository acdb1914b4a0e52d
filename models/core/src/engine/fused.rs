//! RMS norm, softmax and the SwiGLU product as single CPU ops with their own backward.
//!
//! Composed from candle's primitives (ops.rs), an RMS norm is seven autograd nodes, a softmax
//! five, and `silu(g) · u` two whose backward builds eight temporaries the size of the MLP's
//! hidden layer. candle's backward allocates a zeroed gradient for every node and adds each
//! contribution into it, and each primitive runs on one thread, so in an editing step these
//! small element-wise nodes cost about as much as a third of the matrix products. Each op here
//! is one node: the forward keeps what the backward needs (the output), rows are split across
//! rayon's threads when there are enough of them, and the backward is one pass per row.
//!
//! Only contiguous f32 CPU tensors take this path ([`applies`]); anything else uses the
//! compositions, whose results these match to float rounding (tests below).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::rope::{RopeStyle, RopeTables};

/// Below this many elements a row loop on the calling thread beats handing work to rayon.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Whether `x` can go through the fused ops.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension; the backward gives `dx` only
/// (norm weights are never trained through the gradient path).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// `silu(gate) · up`, elementwise over same-shaped tensors (the SwiGLU MLP's hidden layer).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// Rotates `x: [batch, heads, seq, rot]` (contiguous) by the angles of `tables`
/// (`[batch, seq, rot/2]`); pairs as `style` says. The backward is the same rotation by the
/// opposite angles.
pub fn rope(x: &Tensor, tables: &RopeTables, style: RopeStyle) -> candle_core::Result<Tensor> {
    let (b, _, s, d) = x.dims4()?;
    let (cos, sin) = (&tables.cos, &tables.sin);
    if cos.dims() != [b, s, d / 2] || sin.dims() != [b, s, d / 2] || d % 2 != 0 {
        candle_core::bail!(
            "rope: tables {:?}/{:?} do not fit {:?}",
            cos.dims(),
            sin.dims(),
            x.dims()
        );
    }
    let op = Rope {
        cos: tables.cos_host.clone(),
        sin: tables.sin_host.clone(),
        style,
        backward: false,
    };
    x.contiguous()?.apply_op1(op)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::frozen::f32_slice(s, l)
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: only contiguous f32 is fused")))
}

/// Runs `f(row_index, out_row)` over every `d`-wide row of `out`, on rayon's threads when the
/// output is large enough.
fn for_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(d).enumerate().for_each(|(r, o)| f(r, o));
    }
}

fn last_dim(l: &Layout) -> candle_core::Result<usize> {
    match l.shape().dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("fused op: empty last dimension in {:?}", l.shape()),
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, "rms norm")?;
        let w = f32_data(s2, l2, "rms norm weight")?;
        let d = last_dim(l1)?;
        if w.len() != d {
            candle_core::bail!("rms norm: weight of {} for rows of {d}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, d, |r, out| {
            let row = &x[r * d..(r + 1) * d];
            let inv = inv_rms(row, self.eps);
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
                *o = v * inv * g;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(
            w,
            &grad_res.contiguous()?,
            &RmsNormBackward { eps: self.eps },
        )?;
        Ok((Some(dx), None))
    }
}

/// `dx_j = r·(g⊙w)_j − x_j · r³ · mean(g⊙w⊙x)`, r = rsqrt(mean(x²) + eps).
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, "rms norm backward")?;
        let w = f32_data(s2, l2, "rms norm backward weight")?;
        let g = f32_data(s3, l3, "rms norm backward gradient")?;
        let d = last_dim(l1)?;
        if g.len() != x.len() || w.len() != d {
            candle_core::bail!("rms norm backward: operand sizes do not match");
        }
        let mut dx = vec![0f32; x.len()];
        for_rows(&mut dx, d, |r, out| {
            let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            let inv = inv_rms(xr, self.eps);
            let dot = xr
                .iter()
                .zip(gr)
                .zip(w)
                .map(|((&xv, &gv), &wv)| gv * wv * xv)
                .sum::<f32>()
                / d as f32;
            let c = inv * inv * inv * dot;
            for (((o, &xv), &gv), &wv) in out.iter_mut().zip(xr).zip(gr).zip(w) {
                *o = inv * gv * wv - xv * c;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "softmax")?;
        let d = last_dim(l)?;
        let mut y = vec![0f32; x.len()];
        for_rows(&mut y, d, |r, out| {
            let row = &x[r * d..(r + 1) * d];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += *o;
            }
            out.iter_mut().for_each(|o| *o /= sum);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &grad_y.contiguous()?,
            &SoftmaxBackward,
        )?))
    }
}

/// `dx = y ⊙ (g − Σ g⊙y)` per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, "softmax backward")?;
        let g = f32_data(s2, l2, "softmax backward gradient")?;
        if g.len() != y.len() {
            candle_core::bail!("softmax backward: operand sizes do not match");
        }
        let d = last_dim(l1)?;
        let mut dx = vec![0f32; y.len()];
        for_rows(&mut dx, d, |r, out| {
            let (yr, gr) = (&y[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            let dot = yr.iter().zip(gr).map(|(a, b)| a * b).sum::<f32>();
            for ((o, &yv), &gv) in out.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct Rope {
    /// `[batch, seq, rot/2]`, row-major.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    style: RopeStyle,
    /// Rotate by the opposite angles (the transpose: the backward of the forward rotation).
    backward: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(st, l, "rope")?;
        let (b, h, s, d) = l.shape().dims4()?;
        let half = d / 2;
        if self.cos.len() != b * s * half || self.sin.len() != self.cos.len() {
            candle_core::bail!("rope: tables of {} for {:?}", self.cos.len(), l.shape());
        }
        let sign = if self.backward { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        // One row = one (batch, head, position); its angles are those of (batch, position).
        for_rows(&mut y, d, |r, out| {
            let (bi, si) = (r / (h * s), r % s);
            let t = (bi * s + si) * half;
            let row = &x[r * d..(r + 1) * d];
            for i in 0..half {
                let (c, sn) = (self.cos[t + i], sign * self.sin[t + i]);
                let (ia, ib) = match self.style {
                    RopeStyle::HalfSplit => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (a, bb) = (row[ia], row[ib]);
                out[ia] = a * c - bb * sn;
                out[ib] = bb * c + a * sn;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            style: self.style,
            backward: !self.backward,
        };
        Ok(Some(grad_y.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Runs `f(i)` for every element of a new vector of `n`, in parallel chunks when `n` is large.
fn elementwise(n: usize, f: impl Fn(usize) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let chunk = 1 << 13;
    let fill = |(c, o): (usize, &mut [f32])| {
        for (j, v) in o.iter_mut().enumerate() {
            *v = f(c * chunk + j);
        }
    };
    if n >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(chunk).enumerate().for_each(fill);
    } else {
        out.chunks_mut(chunk).enumerate().for_each(fill);
    }
    out
}

fn same_len(a: &[f32], b: &[f32], what: &str) -> candle_core::Result<()> {
    if a.len() != b.len() {
        candle_core::bail!("{what}: operands of {} and {} elements", a.len(), b.len());
    }
    Ok(())
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_data(s1, l1, "swiglu gate")?;
        let u = f32_data(s2, l2, "swiglu up")?;
        same_len(g, u, "swiglu")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        // candle's silu: v / (1 + e^−v).
        let y = elementwise(g.len(), |i| g[i] / (1.0 + (-g[i]).exp()) * u[i]);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad_res.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &dy, &SwigluGateGrad)?;
        let d_up = gate.apply_op2_no_bwd(&dy, &SwigluUpGrad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `∂/∂g = dy · u · σ(g) · (1 + g · (1 − σ(g)))`.
struct SwigluGateGrad;

impl CustomOp3 for SwigluGateGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-gate-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_data(s1, l1, "swiglu gate grad")?;
        let u = f32_data(s2, l2, "swiglu gate grad up")?;
        let dy = f32_data(s3, l3, "swiglu gate grad dy")?;
        same_len(g, u, "swiglu gate grad")?;
        same_len(g, dy, "swiglu gate grad")?;
        let dg = elementwise(g.len(), |i| {
            let s = sigmoid(g[i]);
            dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s))
        });
        Ok((CpuStorage::F32(dg), l1.shape().clone()))
    }
}

/// `∂/∂u = dy · silu(g)`.
struct SwigluUpGrad;

impl CustomOp2 for SwigluUpGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-up-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_data(s1, l1, "swiglu up grad")?;
        let dy = f32_data(s2, l2, "swiglu up grad dy")?;
        same_len(g, dy, "swiglu up grad")?;
        let du = elementwise(g.len(), |i| dy[i] * g[i] * sigmoid(g[i]));
        Ok((CpuStorage::F32(du), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::{self, Path};
    use crate::engine::test_util::max_diff;
    use candle_core::{Device, Var, D};

    /// `f(x)` and the gradient of `Σ c ⊙ f(x)` at `x`: a random `c` gives every output element
    /// its own upstream gradient.
    fn value_and_grad(x: &Tensor, c: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let y = f(var.as_tensor());
        let grads = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
        (y, grads.get(var.as_tensor()).unwrap().clone())
    }

    /// Under and over the size at which rows are split between threads.
    fn inputs() -> Vec<Tensor> {
        let dev = Device::Cpu;
        vec![
            Tensor::randn(0f32, 3., (2, 5, 64), &dev).unwrap(),
            Tensor::randn(0f32, 3., (4, 9, 24, 40), &dev).unwrap(),
        ]
    }

    #[test]
    fn fused_rms_norm_matches_the_composition_in_value_and_gradient() {
        for x in inputs() {
            let d = x.dim(D::Minus1).unwrap();
            let w = Tensor::randn(1f32, 0.1, d, x.device()).unwrap();
            let c = Tensor::randn(0f32, 1., x.shape(), x.device()).unwrap();
            let composed = |x: &Tensor| {
                let mean_sq = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let inv = (mean_sq + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
                x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap()
            };
            let (y1, g1) = value_and_grad(&x, &c, &|x| rms_norm(x, &w, 1e-5).unwrap());
            let (y2, g2) = value_and_grad(&x, &c, &composed);
            assert!(max_diff(&y1, &y2) < 1e-5, "value {}", max_diff(&y1, &y2));
            assert!(max_diff(&g1, &g2) < 1e-4, "gradient {}", max_diff(&g1, &g2));
            let inference = ops::rms_norm(&x, &w, 1e-5, Path::Inference).unwrap();
            assert!(max_diff(&y1, &inference) < 1e-5);
        }
    }

    #[test]
    fn fused_swiglu_matches_the_composition_in_value_and_both_gradients() {
        let dev = Device::Cpu;
        for shape in [(2, 5, 24), (4, 30, 1536)] {
            let g = Tensor::randn(0f32, 3., shape, &dev).unwrap();
            let u = Tensor::randn(0f32, 1., shape, &dev).unwrap();
            let c = Tensor::randn(0f32, 1., shape, &dev).unwrap();
            let run = |fused: bool| {
                let (gv, uv) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
                let y = if fused {
                    swiglu(gv.as_tensor(), uv.as_tensor()).unwrap()
                } else {
                    (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap()
                };
                let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                let dg = grads.get(gv.as_tensor()).unwrap().clone();
                let du = grads.get(uv.as_tensor()).unwrap().clone();
                (y, dg, du)
            };
            let (y1, dg1, du1) = run(true);
            let (y2, dg2, du2) = run(false);
            assert!(max_diff(&y1, &y2) < 1e-5, "value {}", max_diff(&y1, &y2));
            assert!(
                max_diff(&dg1, &dg2) < 1e-4,
                "d gate {}",
                max_diff(&dg1, &dg2)
            );
            assert!(max_diff(&du1, &du2) < 1e-5, "d up {}", max_diff(&du1, &du2));
        }
    }

    #[test]
    fn fused_rope_matches_the_composition_in_value_and_gradient() {
        let dev = Device::Cpu;
        for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
            let rope = crate::engine::rope::Rope {
                style,
                theta: 10000.0,
                rotary_dim: 16,
                head_dim: 16,
            };
            let positions: Vec<u32> = (0..2 * 5).map(|p| (p * 3) as u32).collect();
            let t = rope.tables(&positions, 2, 5, &dev).unwrap();
            let x = Tensor::randn(0f32, 1., (2, 3, 5, 16), &dev).unwrap();
            let c = Tensor::randn(0f32, 1., (2, 3, 5, 16), &dev).unwrap();
            let (y1, g1) = value_and_grad(&x, &c, &|x| rope_fn(x, &t, style));
            let (y2, g2) = value_and_grad(&x, &c, &|x| rope.apply(x, &t, Path::Gradient).unwrap());
            assert!(
                max_diff(&y1, &y2) < 1e-6,
                "{style:?} value {}",
                max_diff(&y1, &y2)
            );
            assert!(
                max_diff(&g1, &g2) < 1e-6,
                "{style:?} gradient {}",
                max_diff(&g1, &g2)
            );
        }
    }

    fn rope_fn(x: &Tensor, t: &crate::engine::rope::RopeTables, style: RopeStyle) -> Tensor {
        rope(x, t, style).unwrap()
    }

    #[test]
    fn fused_softmax_matches_the_composition_in_value_and_gradient() {
        for x in inputs() {
            let c = Tensor::randn(0f32, 1., x.shape(), x.device()).unwrap();
            let composed = |x: &Tensor| {
                let max = x.max_keepdim(D::Minus1).unwrap().detach();
                let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
                let sum = e.sum_keepdim(D::Minus1).unwrap();
                e.broadcast_div(&sum).unwrap()
            };
            let (y1, g1) = value_and_grad(&x, &c, &|x| softmax_last_dim(x).unwrap());
            let (y2, g2) = value_and_grad(&x, &c, &composed);
            assert!(max_diff(&y1, &y2) < 1e-6, "value {}", max_diff(&y1, &y2));
            assert!(max_diff(&g1, &g2) < 1e-5, "gradient {}", max_diff(&g1, &g2));
        }
        // A row masked down to one key gives exactly that key.
        let x = Tensor::new(
            &[[0f32, f32::NEG_INFINITY, f32::NEG_INFINITY]],
            &Device::Cpu,
        )
        .unwrap();
        let y = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.0, 0.0, 0.0]]);
    }
}
